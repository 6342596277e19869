r"""Exact reversible learning: hypergradients through long training runs without storing them.

Maclaurin, Duvenaud & Adams (2015) observed that SGD with momentum can be run *backwards*:
from the state after step :math:`t+1` the state before it follows from the update rule,

.. math::

    w_t = w_{t+1} + \eta_t\, b_{t+1}, \qquad
    b_t = \bigl(b_{t+1} - \nabla_w L(w_t, \lambda)\bigr) / \mu_t ,

so reverse-mode differentiation through :math:`T` steps can recompute the trajectory while it
walks back instead of storing it.  In floating point the division by :math:`\mu_t < 1`
amplifies round-off by :math:`1/\mu_t` per step (:math:`0.9^{-600} \approx 10^{27}`), so
the reconstructed :math:`w_0` is garbage after a few hundred steps.  The cure is to make every
operation exactly invertible:

* weights and velocities are fixed-point integers (``int64``; ``W = round(w * 2**f)``, ``f``
  fraction bits), so additions and subtractions are exact;
* a float input to an addition (the gradient, the update :math:`\eta_t b_{t+1}`) is rounded
  to the grid by a deterministic function of state the reverse pass also has;
* the multiplication :math:`b \mapsto \mu_t b` with :math:`\mu_t \approx n/d` (a fraction
  with :math:`d \le` ``max_denominator``) destroys about :math:`\log_2(d/n)` bits per
  weight; they are kept exactly in an :class:`InfoBuffer`, one arbitrary-precision natural
  number per weight, which grows by :math:`\log_2(1/\mu)` bits per weight and step
  (0.152 bits for :math:`\mu = 0.9`, against 64 bits to store a float64).

**The exact multiplication.**  Write :math:`x = qd + r` (:math:`0 \le r < d`).  Pop
:math:`u \in [0, n)` from the buffer, form :math:`z = rn + u \in [0, dn)`, set
:math:`s = \lfloor z/d \rfloor \in [0, n)`, push :math:`z \bmod d` and return
:math:`y = qn + s`.  Then :math:`y = \lfloor (xn + u)/d \rfloor`: the product :math:`xn/d`
rounded *with a dither* taken from the buffer, never more than one grid unit
(:math:`2^{-f}`) off.  The inverse reads :math:`q, s` off :math:`y`, pops :math:`z \bmod d`,
rebuilds :math:`z`, hence :math:`r = \lfloor z/n \rfloor` and :math:`u = z \bmod n`, and pushes
:math:`u` back.  (Maclaurin's ExactRep pops :math:`u` into the low bits directly, which is off
by up to :math:`n` grid units; the dithered form costs the same :math:`\log_2(d/n)` bits and
is as accurate as rounding.)  With :math:`\mu_t = 0` the velocity is forgotten completely and
all of it is pushed (64 bits: four 16-bit digits), no better than storing the trajectory.

**What is differentiated.**  The reverse pass applies the vector-Jacobian products of the
*real-valued* update

.. math::

    b_{t+1} = \mu_t\, b_t + \nabla_w L(w_t, \lambda), \qquad
    w_{t+1} = w_t - \eta_t\, b_{t+1}

(``torch.optim.SGD`` with dampening 0, as in :func:`~hypergradient.unrolled_hypergrad`) at
the points of the fixed-point trajectory, which it reconstructs bit for bit.  That
trajectory differs from a float64 run only by rounding: at most one grid unit per operation
(:math:`2^{-52} \approx 2.2\cdot 10^{-16}` absolute with the default 52 fraction bits), plus
:math:`|\mu_t - n/d|\,|b|` per step from the fraction (zero for :math:`\mu = 0.9 = 9/10`, about
:math:`d_{\max}^{-2} \approx 10^{-12}` for a generic value).  So on a problem that is not
chaotic the result agrees with reverse mode to ~1e-13 relative, far below the 1e-8 tests ask.

Reverse pass per step: one gradient with ``create_graph`` and one backward through it (the
Hessian-vector product :math:`\nabla^2_w L\,u` and the mixed term
:math:`\nabla^2_{\lambda w} L\,u` together), plus integer bookkeeping.  The forward pass
costs one gradient per step.  Memory: the weights, the velocity, two adjoint vectors, one
step's graph and the buffer (:math:`\approx T \log_2(1/\mu)` bits per weight, held as 43-bit
digits in ``int64`` words with the default ``max_denominator``) - independent of :math:`T`
except for the buffer.

``inner_loss`` must be a deterministic function of ``(params, hparams)``: the reverse pass
recomputes every gradient and needs the same bits as the forward pass (no dropout, no batch
sampled inside the loss).  A violation is detected - the reconstructed :math:`w_0` differs
from the given one - and reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from .._errors import HypergradientError, check_scalar_loss, check_tree
from ._checks import (
    check_callable,
    check_loss_dtype,
    check_params_hparams,
    ignored_hparam_error,
)
from .unrolled import StepHParam, _resolve_step_hparam

_WHERE = "hypergradient.reversible_hypergrad(...)"

# Fixed-point values handed to the integer state (gradients, updates, initial weights) stay
# below 2**61 and the state below 2**62, so one addition of the two never wraps an int64.
_INPUT_LIMIT = 2**61
_STATE_LIMIT = 2**62
# A fully forgotten velocity (momentum 0) is pushed as 4 digits of 16 bits, offset by 2**62.
_WIDE_BASE, _WIDE_DIGITS, _WIDE_OFFSET = 2**16, 4, 2**62

ParamsInit = Mapping[str, torch.Tensor] | Callable[[Mapping[str, torch.Tensor]], Mapping]


# ======================================================================================
# The information buffer: one arbitrary-precision natural number per weight
# ======================================================================================


class InfoBuffer:
    r"""A vector of arbitrary-precision naturals :math:`S_i \ge 0`, used as a stack of digits.

    ``push(digits, base)`` sets :math:`S_i \leftarrow S_i \cdot base + digit_i`;
    ``pop(base)`` returns :math:`S_i \bmod base` and sets
    :math:`S_i \leftarrow \lfloor S_i / base \rfloor`.  They are exact inverses when used in
    last-in first-out order, which is how the exact multiplication stores the bits it
    destroys.  Popping from :math:`S_i = 0` returns 0 and leaves 0.

    Representation: an ``int64`` tensor of shape ``(capacity, size)`` of little-endian digits
    of ``limb_bits = 63 - ceil(log2(max_base))`` bits (47 for bases up to :math:`2^{16}`), so
    ``digit * base`` and ``remainder * 2**limb_bits + digit`` never overflow.  All numbers
    share the number of digits in use.  Cost per push: a handful of element-wise operations
    on ``(size, digits in use)``; per pop: a loop over the digits in use (the remainder
    carries from the top digit down).  Memory: ``8 * size * capacity`` bytes, i.e.
    ``64 / limb_bits`` (1.36 for 47-bit digits) times the information held, plus one digit.

    Args:
        size: how many numbers (one per weight).
        max_base: the largest base ``push``/``pop`` will be called with.
        device: where the digits live.
    """

    def __init__(self, size: int, *, max_base: int = 2**16, device=None):
        if not isinstance(size, int) or size < 1:
            raise HypergradientError(f"InfoBuffer(size={size!r}): expected an int >= 1.")
        if not isinstance(max_base, int) or not 2 <= max_base <= 2**31:
            raise HypergradientError(
                f"InfoBuffer(max_base={max_base!r}): expected an int in [2, 2**31]."
            )
        self.size = size
        self.max_base = max_base
        self.limb_bits = 63 - (max_base - 1).bit_length()
        self._mask = (1 << self.limb_bits) - 1
        # digit-major: row j holds digit j of every number, so each step of the division
        # loop reads and writes one contiguous row
        self._limbs = torch.zeros(4, size, dtype=torch.int64, device=device)
        self._used = 0  # digits 0.._used-1 may be nonzero; the rest are zero
        self.peak_bytes = self.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the digits now."""
        return self._limbs.numel() * self._limbs.element_size()

    def _check_base(self, base: int) -> None:
        if not 1 <= base <= self.max_base:
            raise HypergradientError(
                f"InfoBuffer: base {base} is outside [1, max_base={self.max_base}]."
            )

    def _grow(self, digits: int) -> None:
        capacity = self._limbs.shape[0]
        if digits <= capacity:
            return
        new = torch.zeros(
            max(digits, 2 * capacity), self.size, dtype=torch.int64, device=self._limbs.device
        )
        new[:capacity] = self._limbs
        self._limbs = new
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def push(self, digits: torch.Tensor, base: int) -> None:
        """``S <- S * base + digits`` with ``digits`` an ``int64`` tensor in ``[0, base)``."""
        self._check_base(base)
        if base == 1:
            return
        if self._used == 0:
            if bool(digits.any()):
                self._grow(1)
                self._limbs[0] = digits
                self._used = 1
            return
        k, used = self.limb_bits, self._used
        limbs = self._limbs[:used]
        prod = limbs * base  # < 2**63 by the choice of limb_bits
        torch.bitwise_and(prod, self._mask, out=limbs)
        limbs[1:] += prod[:-1] >> k
        limbs[0] += digits
        top = prod[-1] >> k
        # Each digit is now below 2**k + 2**(bits(base)+1): at most a carry of one, which
        # ripples further only through digits that were all ones (rare; the loop ends).
        carry = limbs >> k
        while bool(carry.any()):
            limbs &= self._mask
            limbs[1:] += carry[:-1]
            top += carry[-1]
            carry = limbs >> k
        if bool(top.any()):
            self._grow(used + 1)
            self._limbs[used] = top
            self._used += 1

    def pop(self, base: int) -> torch.Tensor:
        """Return ``S mod base`` (``int64``) and set ``S <- S // base``."""
        self._check_base(base)
        remainder = torch.zeros(self.size, dtype=torch.int64, device=self._limbs.device)
        if base == 1 or self._used == 0:
            return remainder
        k = self.limb_bits
        for j in reversed(range(self._used)):
            current = (remainder << k).add_(self._limbs[j])
            quotient = torch.div(current, base, rounding_mode="floor", out=self._limbs[j])
            # one integer division per digit (the slow operation); the remainder by product
            remainder = current.sub_(quotient * base)
        while self._used > 0 and not bool(self._limbs[self._used - 1].any()):
            self._used -= 1
        return remainder

    def push_wide(self, values: torch.Tensor) -> None:
        """Push ``int64`` values in ``[0, 2**64)`` as 4 digits of 16 bits (low digit first)."""
        for i in range(_WIDE_DIGITS):
            self.push((values >> (16 * i)) & (_WIDE_BASE - 1), _WIDE_BASE)

    def pop_wide(self) -> torch.Tensor:
        """Inverse of :meth:`push_wide`."""
        out = torch.zeros(self.size, dtype=torch.int64, device=self._limbs.device)
        for i in reversed(range(_WIDE_DIGITS)):
            out |= self.pop(_WIDE_BASE) << (16 * i)
        return out

    def bit_lengths(self) -> torch.Tensor:
        """``int64`` tensor of ``S_i.bit_length()``: the information each number holds."""
        if self._used == 0:
            return torch.zeros(self.size, dtype=torch.int64, device=self._limbs.device)
        limbs = self._limbs[: self._used].T
        position = torch.arange(1, self._used + 1, device=limbs.device)
        top = ((limbs != 0) * position).amax(dim=1) - 1  # index of the top nonzero digit
        top_digit = limbs.gather(1, top.clamp(min=0)[:, None])[:, 0]
        # frexp: x = m * 2**e with m in [0.5, 1): e is the bit length (digits < 2**53 are exact)
        _, exponent = torch.frexp(top_digit.to(torch.float64))
        bits = top * self.limb_bits + exponent.to(torch.int64)
        return torch.where(top >= 0, bits, torch.zeros_like(bits))

    def is_empty(self) -> bool:
        """Are all numbers zero (every push undone)?"""
        return self._used == 0

    def to_ints(self) -> list[int]:
        """The numbers as Python ints (for tests and inspection; slow for large buffers)."""
        out = []
        for row in self._limbs[: self._used].T.tolist():
            value = 0
            for digit in reversed(row):
                value = (value << self.limb_bits) | digit
            out.append(value)
        return out


# ======================================================================================
# SGD with momentum on fixed-point integers, exactly invertible
# ======================================================================================


@dataclass
class ExactState:
    """The exact state of :class:`ExactMomentumSGD`: flat ``int64`` weights and velocity.

    ``w = W * 2**-fraction_bits`` and ``b = B * 2**-fraction_bits``; ``buffer`` holds the
    bits the momentum multiplications destroyed.  Steps update the fields in place.
    """

    w: torch.Tensor
    b: torch.Tensor
    buffer: InfoBuffer


def momentum_fraction(mu: float, max_denominator: int) -> tuple[int, int]:
    """The fraction ``n/d`` (``d <= max_denominator``) closest to ``mu`` in ``[0, 1]``."""
    frac = Fraction(mu).limit_denominator(max_denominator)
    return frac.numerator, frac.denominator


class ExactMomentumSGD:
    r"""``torch.optim.SGD`` with momentum (dampening 0) on fixed-point integers, invertible.

    Forward step :math:`t` (in integers, with :math:`[\cdot]` rounding to the grid
    :math:`2^{-f}`):

    .. math::

        B_{t+1} = \mathrm{mul}_t(B_t) + [g_t], \qquad
        W_{t+1} = W_t - [\eta_t\, B_{t+1}],

    where :math:`\mathrm{mul}_t` is the exact multiplication by :math:`\mu_t \approx n_t/d_t`
    (see the module docstring) that keeps what it destroys in ``state.buffer``.
    :meth:`undo_position` and :meth:`undo_velocity` invert the two halves, so a reverse pass
    can recompute :math:`g_t = \nabla_w L(w_t)` in between, exactly as the forward pass did.

    Args:
        lrs: the learning rates :math:`\eta_t`, one float per step.
        momenta: the momenta :math:`\mu_t \in [0, 1]`, one float per step.
        fraction_bits: :math:`f`; values must stay below :math:`2^{61-f}` in magnitude (512
            for the default 52) and are resolved to :math:`2^{-f}`.
        max_denominator: the largest :math:`d` of the fractions :math:`n_t/d_t`.
    """

    def __init__(
        self,
        lrs: Sequence[float],
        momenta: Sequence[float],
        *,
        fraction_bits: int = 52,
        max_denominator: int = 2**20,
        where: str = "hypergradient.ExactMomentumSGD(...)",
    ):
        if not isinstance(fraction_bits, int) or isinstance(fraction_bits, bool):
            raise HypergradientError(
                f"{where}: fraction_bits must be an int, got {fraction_bits!r}."
            )
        if not 8 <= fraction_bits <= 60:
            raise HypergradientError(
                f"{where}: fraction_bits={fraction_bits}; expected 8..60 (52 resolves values "
                f"to 2.2e-16 and allows magnitudes up to 512)."
            )
        if (
            not isinstance(max_denominator, int)
            or isinstance(max_denominator, bool)
            or not 1 <= max_denominator <= 2**24
        ):
            raise HypergradientError(
                f"{where}: max_denominator={max_denominator!r}; expected an int in [1, 2**24]."
            )
        if len(lrs) != len(momenta):
            raise HypergradientError(
                f"{where}: got {len(lrs)} learning rates and {len(momenta)} momenta; "
                f"expected one of each per step."
            )
        self.where = where
        self.fraction_bits = fraction_bits
        self.scale = 2.0**fraction_bits
        self.lrs = [float(v) for v in lrs]
        self.momenta = [float(v) for v in momenta]
        self.fractions = [momentum_fraction(mu, max_denominator) for mu in self.momenta]
        self.max_base = max(_WIDE_BASE, max_denominator)

    @property
    def steps(self) -> int:
        return len(self.lrs)

    @property
    def value_limit(self) -> float:
        """Magnitude a gradient, an update or an initial weight must stay below."""
        return _INPUT_LIMIT / self.scale

    def bits_per_step(self, t: int) -> float:
        """Information the multiplication of step ``t`` destroys, per weight (bits)."""
        n, d = self.fractions[t]
        if n == 0:
            return 16.0 * _WIDE_DIGITS
        return math.log2(d / n)

    # ---------------------------------------------------------------- conversions

    def to_fixed(self, x: torch.Tensor, what: str, t: int | None = None) -> torch.Tensor:
        """``round(x * 2**f)`` as ``int64``, refusing NaN/inf and values out of range."""
        x64 = x.detach().to(torch.float64)
        at = "" if t is None else f" at step {t}"
        if x64.numel() == 0:
            return x64.to(torch.int64)
        if not bool(torch.isfinite(x64).all()):
            raise HypergradientError(
                f"{self.where}: the {what}{at} contains NaN/inf: the inner training "
                f"diverged. Lower the learning rate or the number of steps."
            )
        scaled = torch.round(x64 * self.scale)
        if bool((scaled.abs() >= _INPUT_LIMIT).any()):
            raise HypergradientError(
                f"{self.where}: the largest magnitude in the {what}{at} is "
                f"{float(x64.abs().max()):.4g}, outside the fixed-point range "
                f"+-{self.value_limit:.4g} of fraction_bits={self.fraction_bits}. Pass "
                f"fewer fraction_bits (each one fewer doubles the "
                f"range and halves the resolution), or lower the learning rate if training "
                f"diverges."
            )
        return scaled.to(torch.int64)

    def to_float(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x * 2**-f`` in ``dtype`` (exact in float64 while ``|x| < 2**53``)."""
        return (x.to(torch.float64) / self.scale).to(dtype)

    def _check_state(self, x: torch.Tensor, what: str, t: int) -> None:
        if bool((x.abs() >= _STATE_LIMIT).any()):
            raise HypergradientError(
                f"{self.where}: the {what} after step {t} reaches "
                f"{float(x.abs().max()) / self.scale:.4g}, outside the fixed-point range "
                f"+-{_STATE_LIMIT / self.scale:.4g} of fraction_bits={self.fraction_bits}. Pass "
                f"fewer fraction_bits, or lower the learning rate if training diverges."
            )

    def _update(self, b: torch.Tensor, t: int) -> torch.Tensor:
        """``[eta_t * b]``: a deterministic function of the integer velocity."""
        step = torch.round(self.lrs[t] * b.to(torch.float64))
        if bool((step.abs() >= _INPUT_LIMIT).any()):
            raise HypergradientError(
                f"{self.where}: the update lr * velocity at step {t} reaches "
                f"{float(step.abs().max()) / self.scale:.4g}, outside the fixed-point range "
                f"+-{self.value_limit:.4g} of fraction_bits={self.fraction_bits}. Pass fewer "
                f"fraction_bits, or lower the learning rate if training diverges."
            )
        return step.to(torch.int64)

    # ---------------------------------------------------------------- exact multiplication

    def _mul(self, x: torch.Tensor, t: int, buffer: InfoBuffer) -> torch.Tensor:
        """``y = floor((x n + u) / d)`` with ``u`` popped; pushes what inverts it."""
        n, d = self.fractions[t]
        if n == d:
            return x
        if n == 0:
            buffer.push_wide(x + _WIDE_OFFSET)
            return torch.zeros_like(x)
        q = torch.div(x, d, rounding_mode="floor")
        r = x - q * d
        z = r * n + buffer.pop(n)
        s = torch.div(z, d, rounding_mode="floor")
        buffer.push(z - s * d, d)
        return q * n + s

    def _unmul(self, y: torch.Tensor, t: int, buffer: InfoBuffer) -> torch.Tensor:
        """Inverse of :meth:`_mul`."""
        n, d = self.fractions[t]
        if n == d:
            return y
        if n == 0:
            if bool(y.any()):
                raise _not_reconstructed(self.where, f"the velocity at step {t}")
            return buffer.pop_wide() - _WIDE_OFFSET
        q = torch.div(y, n, rounding_mode="floor")
        s = y - q * n
        z = s * d + buffer.pop(d)
        r = torch.div(z, n, rounding_mode="floor")
        buffer.push(z - r * n, n)
        return q * d + r

    # ---------------------------------------------------------------- steps

    def init(self, w0: torch.Tensor) -> ExactState:
        """The state at ``t = 0`` from flat float weights ``w0`` (zero velocity)."""
        w = self.to_fixed(w0, "initial weights")
        return ExactState(
            w=w,
            b=torch.zeros_like(w),
            buffer=InfoBuffer(w.numel(), max_base=self.max_base, device=w.device),
        )

    def step(self, state: ExactState, grad: torch.Tensor, t: int) -> None:
        """Step ``t`` forward, in place: ``grad`` is the flat gradient at ``w_t``."""
        g = self.to_fixed(grad, "gradient", t)
        state.b = self._mul(state.b, t, state.buffer) + g
        self._check_state(state.b, "velocity", t)
        state.w = state.w - self._update(state.b, t)
        self._check_state(state.w, "weights", t)

    def undo_position(self, state: ExactState, t: int) -> None:
        """``W_{t+1} -> W_t`` (needs only ``B_{t+1}``), in place."""
        state.w = state.w + self._update(state.b, t)

    def undo_velocity(self, state: ExactState, grad: torch.Tensor, t: int) -> None:
        """``B_{t+1} -> B_t`` given the flat gradient at ``w_t`` (after :meth:`undo_position`)."""
        g = self.to_fixed(grad, "gradient", t)
        state.b = self._unmul(state.b - g, t, state.buffer)


def _not_reconstructed(where: str, what: str) -> HypergradientError:
    return HypergradientError(
        f"{where}: the reverse pass did not reconstruct {what} exactly, so the gradients it "
        f"recomputed differ from the forward pass's. `inner_loss` must be a deterministic "
        f"function of (params, hparams): no dropout or other randomness, no mini-batch "
        f"drawn inside it, no state that changes between calls. Use mode='reverse' for a "
        f"stochastic inner loss."
    )


# ======================================================================================
# The hypergradient
# ======================================================================================


@dataclass(frozen=True)
class ReversibleStats:
    """What a reversible run stored, next to what storing the trajectory would cost.

    Attributes:
        steps: ``T``.
        num_weights: ``P``, scalar weights.
        buffer_bits: information held by the buffer after the forward pass (its peak), summed
            over weights.
        bits_per_weight_per_step: ``buffer_bits / (P * T)``.
        idle_weights: weights whose buffer stayed empty: a velocity that is exactly zero
            throughout (e.g. weights fed by an input that is always zero) loses nothing.
        expected_bits_per_weight_per_step: the mean of ``log2(d_t / n_t)`` (64 where
            ``mu_t = 0``): what the buffer must hold.
        buffer_bytes: peak bytes allocated for the buffer.
        trajectory_bytes: what storing ``w_t, b_t`` for every step would take at the weights'
            dtype (``2 P T`` values).
        momentum_max_error: ``max_t |mu_t - n_t / d_t|``, the momentum actually applied.
        fraction_bits: ``f``.
    """

    steps: int
    num_weights: int
    buffer_bits: int
    bits_per_weight_per_step: float
    idle_weights: int
    expected_bits_per_weight_per_step: float
    buffer_bytes: int
    trajectory_bytes: int
    momentum_max_error: float
    fraction_bits: int


@dataclass(frozen=True)
class ReversibleResult:
    """``hypergrad`` (shaped like ``hparams``), ``params`` (``w_T``, detached), ``stats``."""

    hypergrad: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    stats: ReversibleStats


@dataclass(frozen=True)
class _Layout:
    """Flat vector <-> dict of tensors, in a fixed key order."""

    keys: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, tree: Mapping[str, torch.Tensor]) -> _Layout:
        return cls(tuple(tree), tuple(v.shape for v in tree.values()))

    def flatten(self, tree: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tree[k].reshape(-1) for k in self.keys])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [math.prod(s) for s in self.shapes]
        parts = torch.split(flat, sizes)
        return {k: p.view(s) for k, p, s in zip(self.keys, parts, self.shapes)}

    def leaves(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fresh leaves that require grad (for one differentiated evaluation)."""
        return {k: v.detach().requires_grad_(True) for k, v in self.unflatten(flat).items()}


def initial_params(where: str, init: Callable, hparams: Mapping[str, torch.Tensor]) -> dict:
    """Evaluate ``init(hparams)`` once (no graph) and check it is a dict of finite tensors."""
    with torch.no_grad():
        value = init({k: v.detach() for k, v in hparams.items()})
    if not isinstance(value, Mapping):
        raise HypergradientError(
            f"{where}: params0 is a callable, so it must return the initial weights as a "
            f"dict of tensors (e.g. `lambda h: {{k: h['init_scale'] * v for k, v in "
            f"w_init.items()}}`), got {type(value).__name__}."
        )
    check_tree(where, "params0(hparams)", value)
    return {k: v.detach() for k, v in value.items()}


def _scalar_schedule(where: str, name: str, fn: Callable, hparams: Mapping, steps: int):
    """The floats ``fn(hparams, t)`` for every step, checked."""
    values = []
    for t in range(steps):
        value = fn(hparams, t)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise HypergradientError(
                    f"{where}: {name} at step {t} has shape {tuple(value.shape)}; reversible "
                    f"mode needs one scalar {name} per step."
                )
            value = float(value.detach())
        value = float(value)
        if not math.isfinite(value):
            raise HypergradientError(f"{where}: {name} at step {t} is {value} (not finite).")
        if name == "momentum" and not 0.0 <= value <= 1.0:
            raise HypergradientError(
                f"{where}: momentum at step {t} is {value}; reversible mode needs momenta in "
                f"[0, 1] (the multiplication by mu is inverted with the stored bits)."
            )
        values.append(value)
    return values


def reversible_hypergrad(
    inner_loss: Callable[[dict, dict], torch.Tensor],
    outer_loss: Callable[[dict, dict], torch.Tensor],
    params0: ParamsInit,
    hparams: Mapping[str, torch.Tensor],
    steps: int,
    lr: StepHParam,
    momentum: StepHParam,
    *,
    fraction_bits: int = 52,
    max_denominator: int = 2**20,
) -> ReversibleResult:
    r"""Hypergradient through ``steps`` SGD-momentum steps by exact reversal (Maclaurin 2015).

    Computes the same derivative as ``unrolled_hypergrad(..., mode="reverse")``,

    .. math::

        \frac{dE(w_T(\lambda), \lambda)}{d\lambda}, \qquad
        b_{t+1} = \mu_t b_t + \nabla_w L(w_t, \lambda),\;
        w_{t+1} = w_t - \eta_t b_{t+1},\; b_0 = 0,\; w_0 = w_0(\lambda),

    without storing the trajectory: the forward pass keeps :math:`w, b` as fixed-point
    integers and the bits the momentum destroys in an :class:`InfoBuffer`; the reverse pass
    rebuilds :math:`w_{T-1}, \dots, w_0` bit for bit while accumulating (adjoints
    :math:`\bar w_T = \nabla_w E`, :math:`\bar b_T = 0`, :math:`u = \bar b_{t+1} -
    \eta_t \bar w_{t+1}`)

    .. math::

        \bar\eta_t = -\bar w_{t+1} \cdot b_{t+1},\quad
        \bar\mu_t = u \cdot b_t,\quad
        \bar w_t = \bar w_{t+1} + \nabla^2_w L\, u,\quad
        \bar b_t = \mu_t u,\quad
        \bar\lambda \mathrel{+}= \nabla^2_{\lambda w} L\, u .

    Args:
        inner_loss: ``inner_loss(params, hparams) -> scalar``; deterministic (see the module
            docstring).  Per-weight regularisation and other hyperparameters of the training
            loss enter here, as for the other modes.
        outer_loss: ``outer_loss(params, hparams) -> scalar`` at ``w_T``.
        params0: the initial weights, a dict of tensors (constants), or a callable
            ``params0(hparams) -> dict`` when they depend on hyperparameters, e.g. an
            initial scale: ``lambda h: {k: h["log_scale"].exp() * v for k, v in
            w_init.items()}``.
        hparams: dict of tensors, same dtype as the weights.
        steps: ``T >= 1``.
        lr: learning rate as in :func:`~hypergradient.unrolled_hypergrad`: a float, a tensor
            (scalar or ``(T,)`` schedule), the name of an ``hparams`` key (scalar or ``(T,)``
            schedule, differentiated) or a callable ``lr(hparams, t) -> scalar tensor``.
        momentum: :math:`\mu`, same forms; every value in ``[0, 1]``.  Each step's value is
            applied as the nearest fraction ``n/d`` with ``d <= max_denominator``.
        fraction_bits: fixed-point resolution :math:`2^{-f}`; weights, velocities, gradients
            and updates must stay below :math:`2^{61-f}` (512 for 52) in magnitude.
        max_denominator: the largest denominator of the momentum fractions.

    Returns:
        :class:`ReversibleResult` with ``hypergrad`` (dict shaped like ``hparams``),
        ``params`` (``w_T``) and ``stats`` (:class:`ReversibleStats`: buffer bits per weight
        and step, bytes, ...).

    Raises:
        HypergradientError: bad input, a value outside the fixed-point range, a diverging
            run, or a reverse pass that failed to reconstruct ``w_0`` (non-deterministic
            ``inner_loss``).

    Cost: forward ``T`` gradients; reverse ``T`` gradients with ``create_graph`` plus ``T``
    backward passes through them (Hessian- and mixed-vector products), and integer
    bookkeeping that grows with the buffer (a loop over its 43-bit digits per step).
    Memory: ``O(P)`` plus one step's graph plus the buffer, about ``T log2(1/mu)`` bits per
    weight (``T * 0.152`` for ``mu = 0.9``), instead of ``O(T)`` step graphs for reverse mode.

    Example::

        >>> import torch, hypergradient as hg
        >>> # L = (w - lam)^2/2 from w0 = 0 with lr 0.5, momentum 0.5: after 2 steps
        >>> # w1 = lam/2, b2 = 0.5 * (-lam) + (-lam/2) = -lam, w2 = w1 + lam/2 = lam; E = w2
        >>> res = hg.reversible_hypergrad(lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum(),
        ...     lambda p, h: p["w"].sum(), {"w": torch.zeros(1, dtype=torch.float64)},
        ...     {"lam": torch.ones(1, dtype=torch.float64)}, steps=2, lr=0.5, momentum=0.5)
        >>> float(res.hypergrad["lam"]), float(res.params["w"])
        (1.0, 1.0)

    References:
        Maclaurin, Duvenaud, Adams (2015), Gradient-based Hyperparameter Optimization through
        Reversible Learning, Algorithms 1-3 and the ExactRep of ``HIPS/hypergrad``.
    """
    return _reversible(
        inner_loss,
        outer_loss,
        params0,
        hparams,
        steps,
        lr,
        momentum,
        fraction_bits=fraction_bits,
        max_denominator=max_denominator,
        where=_WHERE,
    )


def _reversible(
    inner_loss,
    outer_loss,
    params0,
    hparams,
    steps,
    lr,
    momentum,
    *,
    fraction_bits: int = 52,
    max_denominator: int = 2**20,
    where: str = _WHERE,
) -> ReversibleResult:
    check_callable(where, "inner_loss", inner_loss)
    check_callable(where, "outer_loss", outer_loss)
    init = None
    if callable(params0) and not isinstance(params0, Mapping):
        check_tree(where, "hparams", hparams)
        init, params0 = params0, initial_params(where, params0, hparams)
    dtype = check_params_hparams(where, params0, hparams, params_name="params0")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise HypergradientError(f"{where}: steps must be an int >= 1, got {steps!r}.")
    lr_fn = _resolve_step_hparam("lr", lr, hparams, steps, dtype, where=where)
    mom_fn = _resolve_step_hparam("momentum", momentum, hparams, steps, dtype, where=where)
    hp = {k: v.detach() for k, v in hparams.items()}
    sgd = ExactMomentumSGD(
        _scalar_schedule(where, "lr", lr_fn, hp, steps),
        _scalar_schedule(where, "momentum", mom_fn, hp, steps),
        fraction_bits=fraction_bits,
        max_denominator=max_denominator,
        where=where,
    )
    layout = _Layout.of(params0)

    def gradient(w_flat, hp_, create_graph):
        """Flat float gradient at ``w_flat`` (and the leaves and graph when asked)."""
        w = layout.leaves(w_flat)
        with torch.enable_grad():
            loss = inner_loss(w, hp_)
            grads = torch.autograd.grad(
                loss, list(w.values()), create_graph=create_graph, allow_unused=True
            )
        grads = [torch.zeros_like(v) if g is None else g for v, g in zip(w.values(), grads)]
        return torch.cat([g.reshape(-1) for g in grads]).detach(), w, grads, loss

    # ---- forward: T gradients, integer state, nothing of the trajectory kept
    hp_req = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
    w0_flat = layout.flatten(params0).detach()
    state = sgd.init(w0_flat)
    w0_fixed = state.w.clone()
    for t in range(steps):
        # hp_req in both passes: the forward gradients must be bitwise those the reverse
        # pass recomputes, so both evaluate inner_loss on the same kind of inputs.
        g, _, _, loss = gradient(sgd.to_float(state.w, dtype), hp_req, create_graph=False)
        if t == 0:
            check_loss_dtype(
                where, "inner_loss", check_scalar_loss(where, "inner_loss", loss), dtype
            )
        sgd.step(state, g, t)
    bit_lengths = state.buffer.bit_lengths()
    buffer_bits = int(bit_lengths.sum())
    idle_weights = int((bit_lengths == 0).sum())

    # ---- the outer loss at w_T
    w_final = layout.leaves(sgd.to_float(state.w, dtype))
    with torch.enable_grad():
        value = check_scalar_loss(where, "outer_loss", outer_loss(w_final, hp_req))
        check_loss_dtype(where, "outer_loss", value, dtype)
        grads = torch.autograd.grad(value, [*w_final.values(), *hp_req.values()], allow_unused=True)
    num_w = len(w_final)
    dw = torch.cat(
        [
            torch.zeros_like(v).reshape(-1) if g is None else g.reshape(-1)
            for v, g in zip(w_final.values(), grads[:num_w])
        ]
    )
    db = torch.zeros_like(dw)
    d_hp: dict[str, torch.Tensor | None] = dict(zip(hp_req, grads[num_w:]))
    d_lr = torch.zeros(steps, dtype=dtype, device=dw.device)
    d_mom = torch.zeros(steps, dtype=dtype, device=dw.device)

    # ---- reverse: rebuild w_t, b_t exactly and accumulate the adjoints
    hp_list = list(hp_req.values())
    for t in reversed(range(steps)):
        lr_t, mom_t = sgd.lrs[t], sgd.momenta[t]
        d_lr[t] = -torch.dot(dw, sgd.to_float(state.b, dtype))
        u = db - lr_t * dw
        sgd.undo_position(state, t)
        g, w_leaves, g_parts, _ = gradient(sgd.to_float(state.w, dtype), hp_req, True)
        sgd.undo_velocity(state, g, t)
        # One backward through the gradient graph: H u (w.r.t. w) and the mixed term (hparams)
        pairs = [(gp, uk) for gp, uk in zip(g_parts, layout.unflatten(u).values())]
        pairs = [(gp, uk) for gp, uk in pairs if gp.requires_grad]
        hvp = torch.zeros_like(dw)
        if pairs:
            outs = torch.autograd.grad(
                [gp for gp, _ in pairs],
                [*w_leaves.values(), *hp_list],
                grad_outputs=[uk for _, uk in pairs],
                allow_unused=True,
            )
            hvp = torch.cat(
                [
                    torch.zeros_like(v).reshape(-1) if o is None else o.reshape(-1)
                    for v, o in zip(w_leaves.values(), outs[:num_w])
                ]
            )
            for k, o in zip(hp_req, outs[num_w:]):
                if o is not None:
                    d_hp[k] = o if d_hp[k] is None else d_hp[k] + o
        d_mom[t] = torch.dot(u, sgd.to_float(state.b, dtype))
        db = mom_t * u
        dw = dw + hvp.detach()

    if not torch.equal(state.w, w0_fixed) or bool(state.b.any()) or not state.buffer.is_empty():
        raise _not_reconstructed(where, "the initial weights and velocity")

    # ---- the learning rates, momenta and initial weights as functions of the hparams
    def add(key, value):
        d_hp[key] = value if d_hp[key] is None else d_hp[key] + value

    with torch.enable_grad():
        terms = []
        for spec, fn, adjoint in ((lr, lr_fn, d_lr), (momentum, mom_fn, d_mom)):
            if isinstance(spec, str):  # hparams[spec] is the schedule (or one value) itself
                value = hparams[spec]
                add(
                    spec,
                    adjoint.reshape(value.shape)
                    if value.numel() == steps
                    else adjoint.sum().reshape(value.shape),
                )
                continue
            for t in range(steps):  # a callable: the chain rule through autograd
                value = fn(hp_req, t)
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    terms.append(adjoint[t] * value.reshape(()))
        if init is not None:
            w0 = init(hp_req)
            terms.extend(
                (v * part).sum()
                for v, part in zip((w0[k] for k in layout.keys), layout.unflatten(dw).values())
                if isinstance(v, torch.Tensor) and v.requires_grad
            )
        if terms:
            outs = torch.autograd.grad(torch.stack(terms).sum(), hp_list, allow_unused=True)
            for k, o in zip(hp_req, outs):
                if o is not None:
                    add(k, o)
    unused = [k for k, v in d_hp.items() if v is None]
    if unused:
        raise ignored_hparam_error(where, unused, implicit=False)

    num_weights = w0_flat.numel()
    stats = ReversibleStats(
        steps=steps,
        num_weights=num_weights,
        buffer_bits=buffer_bits,
        bits_per_weight_per_step=buffer_bits / (num_weights * steps),
        idle_weights=idle_weights,
        expected_bits_per_weight_per_step=sum(sgd.bits_per_step(t) for t in range(steps)) / steps,
        buffer_bytes=state.buffer.peak_bytes,
        trajectory_bytes=2 * num_weights * steps * w0_flat.element_size(),
        momentum_max_error=max(abs(mu - n / d) for mu, (n, d) in zip(sgd.momenta, sgd.fractions)),
        fraction_bits=fraction_bits,
    )
    params_t = {k: v.detach() for k, v in w_final.items()}
    hypergrad = {k: v.detach() for k, v in d_hp.items() if v is not None}
    return ReversibleResult(hypergrad=hypergrad, params=params_t, stats=stats)
