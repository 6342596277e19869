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
  weight; they are kept exactly in an :class:`InfoBuffer`, an exact stack of digits per
  weight (an ``int64`` state over 16-bit words, coded as in rANS so that a push or a pop
  touches only the state and the top word), which grows by :math:`\log_2(1/\mu)` bits per
  weight and step (0.152 bits for :math:`\mu = 0.9`, against 64 bits to store a float64).

**The exact multiplication.**  Write :math:`x = qd + r` (:math:`0 \le r < d`).  Pop
:math:`u \in [0, n)` from the buffer, form :math:`z = rn + u \in [0, dn)`, set
:math:`s = \lfloor z/d \rfloor \in [0, n)`, push :math:`z \bmod d` and return
:math:`y = qn + s`.  Then :math:`y = \lfloor (xn + u)/d \rfloor`: the product :math:`xn/d`
rounded *with a dither* taken from the buffer, never more than one grid unit
(:math:`2^{-f}`) off.  The inverse reads :math:`q, s` off :math:`y`, pops :math:`z \bmod d`,
rebuilds :math:`z`, hence :math:`r = \lfloor z/n \rfloor` and :math:`u = z \bmod n`, and pushes
:math:`u` back.  (Maclaurin's ExactRep pops :math:`u` into the low bits directly, which is off
by up to :math:`n` grid units; the dithered form costs the same :math:`\log_2(d/n)` bits and
is as accurate as rounding.)  With :math:`\mu_t = 0` (or a momentum that rounds to
:math:`0/1`, below ``1 / (2 max_denominator)``) the velocity is forgotten completely and all
of it is kept (64 bits per weight, stored whole), no better than storing the trajectory: a
:class:`ReversibleMemoryWarning` says so when the mean over the steps reaches the weights'
dtype bits (every step at :math:`\mu = 0` for float64, half of them for float32).

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
costs one gradient per step.  The integer bookkeeping is a few dozen element-wise operations
on the weights per step, whatever :math:`T` (the buffer is only touched at its top).
Memory: the weights, the velocity, two adjoint vectors, one step's graph and the buffer
(:math:`\approx T \log_2(1/\mu)` bits per weight in 16-bit words, plus 12 bytes of state
per weight) - independent of :math:`T` except for the buffer.

``inner_loss`` must be a deterministic function of ``(params, hparams)``: the reverse pass
recomputes every gradient and needs the same bits as the forward pass (no dropout, no batch
sampled inside the loss).  A violation is detected - the fixed-point gradient recomputed at
step :math:`t` differs from the forward pass's (a 16-byte checksum per step is kept), or
the reconstructed :math:`w_0` differs from the given one - and reported.

**Mini-batches and per-layer schedules, as the paper ran them.**  With ``batches=`` (a
function of the step alone, e.g. :class:`SeededBatches`), step :math:`t` trains on
``inner_loss(params, hparams, batches(t))`` and the reverse pass asks for batch :math:`t`
again; a checksum of every batch is kept and compared, so a schedule that changes between
the two passes (a ``DataLoader`` iterator, the global random state) is reported at the
step where it changed instead of returning a wrong hypergradient.  ``lr`` and ``momentum``
may be dicts of per-tensor schedules: each tensor then runs its own exact optimizer (and
buffer), and the learning-rate and momentum adjoints are dot products over its weights
only.
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
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
from ._step import StepHParam, resolve_step_hparam

_WHERE = "hypergradient.reversible_hypergrad(...)"

# Fixed-point values handed to the integer state (gradients, updates, initial weights) stay
# below 2**61 and the state below 2**62, so one addition of the two never wraps an int64.
_INPUT_LIMIT = 2**61
_STATE_LIMIT = 2**62
# A fully forgotten velocity (momentum 0) is kept whole: 64 bits.
_WIDE_BITS = 64
# Steps whose callable-schedule graphs are kept at once for the chain rule.
_CHAIN_CHUNK = 256

ParamsInit = Mapping[str, torch.Tensor] | Callable[[Mapping[str, torch.Tensor]], Mapping]


# ======================================================================================
# The information buffer: per weight, one int64 state over a stack of 16-bit words
# ======================================================================================

# Layout of one weight's number (see InfoBuffer): X = x * 2**(16 k) + the k words below it.
_WORD_BITS = 16
_WORD_MASK = (1 << _WORD_BITS) - 1
_WORD_OFFSET = 1 << (_WORD_BITS - 1)  # words are kept as int16: word - 2**15
_STATE_BITS = 63  # the state x stays below 2**63 (an int64)
_LOW = 1 << (_STATE_BITS - _WORD_BITS)  # L = 2**47: x >= L whenever words lie below it
# A base b that is not a power of two is coded with a precision M = 2**p >= 2**_SLACK_BITS b:
# the symbols get M // b or M // b + 1 slots, so a uniform digit costs log2(b) plus at most
# (8 ln 2)**-1 * 4**-_SLACK_BITS = 7e-4 bits; the one-off of an empty buffer is ~log2(M) bits.
_SLACK_BITS = 4
_MAX_BASE = 2**24
_CHUNK_ROWS = 4  # words are allocated 4 rows (8 bytes per weight) at a time
_UNKNOWN = 1 << _STATE_BITS


class InfoBuffer:
    r"""One exact stack of digits per weight; push and pop cost :math:`O(\text{size})`.

    ``push(digits, base)`` stores one digit in ``[0, base)`` per number; ``pop(base)`` returns
    the digits of the last push with that base and undoes it.  The two are exact inverses in
    last-in first-out order, as the exact multiplication needs.  A pop may also read digits
    that were pushed with *another* base (this is how the multiplication takes back
    :math:`\log_2 n` of the :math:`\log_2 d` bits it stores): pop-then-push with the same
    base restores the buffer exactly as well.  Popping from an empty number returns 0 and
    leaves it empty, so weights whose velocity stays exactly zero store nothing.

    Representation: each number is :math:`X = x \cdot 2^{16k} + (\text{its } k \text{ words})`,
    an ``int64`` state :math:`x` over a stack of :math:`k` 16-bit words (rANS, Duda 2013, as in
    bits-back coding).  A digit :math:`v` of base :math:`b` is coded with a precision
    :math:`M = 2^p` (:math:`M = b` for a power of two, else :math:`M \ge 16 b`) in which it
    owns :math:`f_v \in \{\lfloor M/b \rfloor, \lceil M/b \rceil\}` slots starting at
    :math:`c_v`:

    * push: while :math:`x \ge 2^{63-p} f_v`, move the low 16 bits of :math:`x` onto the
      stack; then :math:`x \leftarrow M \lfloor x / f_v \rfloor + c_v + (x \bmod f_v)`;
    * pop: :math:`v` is the symbol owning slot :math:`x \bmod M`,
      :math:`x \leftarrow f_v \lfloor x / M \rfloor + (x \bmod M) - c_v`; then, while words
      lie below and :math:`x < 2^{47}`, bring the top word back into the low bits.

    Every number keeps :math:`2^{47} \le x < 2^{63}` while it has words (below that only
    when it has none), and :math:`M` divides :math:`2^{47}`; that makes the two
    renormalisations exact inverses, so pop undoes push bit for bit with no side
    information.  Below :math:`2^{47}` the digits are ranked positionally instead
    (:math:`x \leftarrow x b + v` where :math:`x < \lfloor M/b \rfloor 2^{47}/M`, and the
    few ranks above in order), a bijection onto exactly the numbers the coding above leaves
    out, so a small number behaves as an arbitrary-precision one: popping from 0 gives 0.
    Only the state and the top word are touched: a push or pop is a few dozen element-wise
    operations on ``size`` numbers plus a scatter for those that spill or refill, whatever
    the depth of the stack.  :meth:`exchange` is pop-then-push without the refills the push
    would spill right back.

    Information: a uniform digit costs :math:`\log_2 b` bits, plus at most 7e-4 (the slots
    are uneven by one) once the number passes :math:`2^{47}`.  Memory: the words (16 bits
    each, allocated 4 rows at a time), the state (8 bytes) and the depth (4 bytes) per
    number: the information held plus under two 64-bit words per number.  Whole 64-bit
    values (:meth:`push_wide`, for momentum 0) are kept apart, 8 bytes each.

    Args:
        size: how many numbers (one per weight).
        max_base: the largest base ``push``/``pop`` will be called with (at most 2**24).
        device: where the state and the words live.
    """

    def __init__(self, size: int, *, max_base: int = 2**16, device=None):
        if not isinstance(size, int) or size < 1:
            raise HypergradientError(f"InfoBuffer(size={size!r}): expected an int >= 1.")
        if not isinstance(max_base, int) or not 2 <= max_base <= _MAX_BASE:
            raise HypergradientError(
                f"InfoBuffer(max_base={max_base!r}): expected an int in [2, 2**24]."
            )
        self.size = size
        self.max_base = max_base
        self._x = torch.zeros(size, dtype=torch.int64, device=device)
        self._depth = torch.zeros(size, dtype=torch.int32, device=device)
        self._one = torch.ones((), dtype=torch.int32, device=device)
        self._minus_one = -self._one
        self._chunks: list[torch.Tensor] = []  # chunk c holds rows 4c..4c+3 of every stack
        self._tables: dict[int, tuple[int, int, int, int]] = {}
        self._refills = 0
        self._small = False  # may a number without words lie in (0, 2**47)?
        # an upper bound of every state (_UNKNOWN: none known); below 2**47 no number has
        # words and the digits are plain positional ones (a few operations per push or pop)
        self._bound = 0
        self._tight = False  # recompute the bound before the next push or pop?
        self._wide: list[torch.Tensor] = []  # push_wide's values
        self.peak_bytes = self.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes allocated now: states, depths and words."""
        words = sum(c.numel() * c.element_size() for c in [*self._chunks, *self._wide])
        return words + self._x.numel() * 8 + self._depth.numel() * 4

    def _table(self, base: int) -> tuple[int, int, int, int]:
        """``(p, q, rem, passes)``: ``M = 2**p``, ``divmod(M, base)``, spills per push."""
        table = self._tables.get(base)
        if table is None:
            if not 1 <= base <= self.max_base:
                raise HypergradientError(
                    f"InfoBuffer: base {base} is outside [1, max_base={self.max_base}]."
                )
            p = (base - 1).bit_length()
            if base & (base - 1):  # not a power of two
                p += _SLACK_BITS
            q, rem = divmod(1 << p, base)
            # a digit of at most 16 bits (q >= M / 2**16) spills or refills one word at most
            passes = 1 if q << _WORD_BITS >= 1 << p else 2
            table = self._tables[base] = (p, q, rem, passes)
        return table

    # ---------------------------------------------------------------- the stack of words

    def _chunk_groups(self, rows: torch.Tensor):
        """``(chunk, selection or None, row in chunk)`` for the rows of a spill or refill."""
        chunk = rows >> 2
        offset = rows & (_CHUNK_ROWS - 1)
        low, high = torch.aminmax(chunk)
        low, high = int(low), int(high)
        if low == high:
            return high, [(low, None, offset)]
        return high, [(c, chunk == c, offset) for c in torch.unique(chunk).tolist()]

    def _spill(self, idx: torch.Tensor) -> None:
        """Move the low word of ``x[idx]`` onto their stacks."""
        x = self._x[idx]
        rows = self._depth[idx].to(torch.int64)
        words = ((x & _WORD_MASK) - _WORD_OFFSET).to(torch.int16)
        top, groups = self._chunk_groups(rows)
        while len(self._chunks) <= top:
            self._chunks.append(
                torch.zeros(_CHUNK_ROWS, self.size, dtype=torch.int16, device=x.device)
            )
            self.peak_bytes = max(self.peak_bytes, self.nbytes)
        for chunk, sel, offset in groups:
            if sel is None:
                self._chunks[chunk][offset, idx] = words
            else:
                self._chunks[chunk][offset[sel], idx[sel]] = words[sel]
        self._depth.index_put_((idx,), self._one, accumulate=True)
        self._x[idx] = x >> _WORD_BITS

    def _refill(self, idx: torch.Tensor) -> None:
        """Bring the top word of the stacks ``idx`` back into the low bits of ``x``."""
        rows = self._depth[idx].to(torch.int64) - 1
        _, groups = self._chunk_groups(rows)
        if groups[0][1] is None:
            words = self._chunks[groups[0][0]][groups[0][2], idx]
        else:
            words = torch.empty(idx.shape, dtype=torch.int16, device=idx.device)
            for chunk, sel, offset in groups:
                words[sel] = self._chunks[chunk][offset[sel], idx[sel]]
        self._depth.index_put_((idx,), self._minus_one, accumulate=True)
        self._bound = _UNKNOWN
        x = (self._x[idx] << _WORD_BITS).add_(words.to(torch.int64)).add_(_WORD_OFFSET)
        self._x[idx] = x
        self._refills += 1
        if self._refills % 16 == 0:
            self._release()

    def _release(self) -> None:
        """Free the chunks above the deepest stack."""
        if self._chunks:
            del self._chunks[-(-int(self._depth.max()) // _CHUNK_ROWS) :]

    # ---------------------------------------------------------------- push and pop

    def _limit(self, digits: torch.Tensor, base: int):
        """``(f, limit)``: the digits' slot counts and the state a push must stay below."""
        p, q, rem, _ = self._table(base)
        f = (digits < rem) + q if rem else q  # the first rem digits own q + 1 slots
        return f, f << (_STATE_BITS - p)

    def _limit_word_below(self, f, base: int):
        """``limit / 2**16`` (at most 2**47 for a digit of at most 16 bits)."""
        return f << (_STATE_BITS - _WORD_BITS - self._table(base)[0])

    def _spill_above(self, limit, base: int) -> None:
        p, q, _, passes = self._table(base)
        if self._bound < q << (_STATE_BITS - p):  # below every digit's limit
            return
        for _ in range(passes):
            idx = torch.nonzero(self._x >= limit).squeeze(1)
            if idx.numel() == 0:
                break
            self._spill(idx)

    def _encode(self, digits: torch.Tensor, base: int, f) -> None:
        """``x <- C(x, digit)`` (the state is below the push's limit)."""
        p, q, rem, _ = self._table(base)
        self._tighten()
        x = self._x
        if not rem:  # a power of two: a plain positional digit
            self._x = (x << p).add_(digits)
            self._bound = min(((self._bound + 1) << p) - 1, _UNKNOWN)
            self._small = True
            return
        kq = (_LOW >> p) * q
        if self._bound < kq:  # every number ranks its digit positionally (see below)
            self._x = torch.add(digits, x, alpha=base)
            self._bound = (self._bound + 1) * base - 1
            self._small = True
            return
        high = torch.div(x, f, rounding_mode="floor")
        # M * high + start + (x - f * high), start = q * digit + min(digit, rem)
        out = torch.addcmul(x, high, (1 << p) - f)
        out.add_(digits, alpha=q).add_(torch.clamp(digits, max=rem))
        # Numbers below 2**47 (only without words) rank their digits positionally: that
        # map takes x < K f exactly to what the above takes to [1, 2**47) (K = 2**47 / M).
        idx = torch.nonzero((out < _LOW) & (out > 0)).squeeze(1)
        self._small = self._tight = bool(idx.numel())
        self._bound = _UNKNOWN
        if self._small:
            xs, vs = x[idx], digits[idx]
            out[idx] = torch.where(xs < kq, xs * base + vs, (xs - kq) * rem + (kq * base) + vs)
        self._x = out

    def _decode(self, base: int) -> torch.Tensor:
        """The digits ``x`` holds and ``x <- the rest`` (below 2**47 possibly, no refill)."""
        p, q, rem, _ = self._table(base)
        self._tighten()
        x = self._x
        if not rem:
            self._x = x >> p
            self._bound >>= p
            self._small = True
            return x & ((1 << p) - 1)
        kq = (_LOW >> p) * q
        if self._bound < kq * base:  # every number ranks its digits positionally
            high = torch.div(x, base, rounding_mode="floor")
            self._x = high
            self._bound //= base
            self._small = True
            return x - high * base
        slot = x & ((1 << p) - 1)
        small = slot < rem * (q + 1)  # the first rem digits own q + 1 slots, the others q
        digits = torch.where(
            small,
            torch.div(slot, q + 1, rounding_mode="floor"),
            torch.div(slot - rem, q, rounding_mode="floor"),
        )
        start = torch.clamp(digits, max=rem).add_(digits, alpha=q)
        self._x = torch.addcmul(slot.sub_(start), x >> p, small + q)
        self._bound = _UNKNOWN
        if self._small:  # positional ranks below 2**47 (see _encode)
            idx = torch.nonzero((x < _LOW) & (x > 0)).squeeze(1)
            if idx.numel():
                self._tight = True
                xs, kqb = x[idx], kq * base
                rest = (xs - kqb).clamp_(min=0)
                positional = xs < kqb
                digits[idx] = torch.where(positional, xs % base, rest % rem)
                self._x[idx] = torch.where(positional, xs // base, rest // rem + kq)
        self._small = True  # a number without words may now lie below 2**47
        return digits

    def _tighten(self) -> None:
        """Bound the states again after an operation that met small ones."""
        if self._tight:
            self._bound = int(self._x.max())
            self._tight = False

    def _refill_below(self, passes: int) -> None:
        for _ in range(passes):
            idx = torch.nonzero((self._x < _LOW) & (self._depth > 0)).squeeze(1)
            if idx.numel() == 0:
                break
            self._refill(idx)

    def push(self, digits: torch.Tensor, base: int) -> None:
        """Store ``digits`` (``int64``, each in ``[0, base)``), one per number."""
        if self._table(base)[0] == 0:  # base 1
            return
        f, limit = self._limit(digits, base)
        self._spill_above(limit, base)
        self._encode(digits, base, f)

    def pop(self, base: int) -> torch.Tensor:
        """Return one digit in ``[0, base)`` per number (``int64``) and remove it."""
        if self._table(base)[0] == 0:  # base 1
            return torch.zeros_like(self._x)
        deep = self._bound >= _LOW  # below 2**47 no number has words
        digits = self._decode(base)
        if deep:
            self._refill_below(self._table(base)[3])
        return digits

    def exchange(self, pop_base: int, push_base: int, fn: Callable):
        """``digits, out = fn(pop(pop_base)); push(digits, push_base); return out``.

        The same result bit for bit, minus the refills that the push would spill right
        back: with digits of at most 16 bits a number refills at most one word,
        ``x * 2**16 + word``, and the push's limit is a multiple of ``2**16``, so whether
        the push spills it again depends on ``x`` alone.  (This is the common case while a
        buffer grows: a pop leaves ~20% of the numbers just below 2**47.)
        """
        pop_table, push_table = self._table(pop_base), self._table(push_base)
        if pop_table[0] == 0 or push_table[0] == 0 or pop_table[3] > 1 or push_table[3] > 1:
            digits, out = fn(self.pop(pop_base))
            self.push(digits, push_base)
            return out
        deep = self._bound >= _LOW  # below 2**47 no number has words
        digits, out = fn(self._decode(pop_base))
        f, limit = self._limit(digits, push_base)
        if deep:
            # f / M <= 1 / base + 1 / M: limit / 2**16 = 2**47 f / M <= 2**47, so x < 2**47
            below = self._limit_word_below(f, push_base)
            idx = torch.nonzero((self._x < below) & (self._depth > 0)).squeeze(1)
            if idx.numel():
                self._refill(idx)
            self._spill_above(limit, push_base)
        self._encode(digits, push_base, f)
        return out

    def push_wide(self, values: torch.Tensor) -> None:
        """Store ``int64`` values whole (64 bits each), apart from the digits.

        For a velocity that is forgotten completely (momentum 0) there is nothing to
        compress: it is kept as it is, one ``int64`` per number, on a stack of its own.
        ``pop_wide`` returns the values of the last ``push_wide`` not yet popped (zeros if
        none), whatever digits were pushed or popped in between.
        """
        self._wide.append(values.to(torch.int64, copy=True))
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def pop_wide(self) -> torch.Tensor:
        """Inverse of :meth:`push_wide`."""
        if not self._wide:
            return torch.zeros_like(self._x)
        return self._wide.pop()

    # ---------------------------------------------------------------- inspection

    def bit_lengths(self) -> torch.Tensor:
        """``int64`` tensor: the bits each number holds (``X_i.bit_length()`` of its digits'
        number, plus 64 per value held by ``push_wide``)."""
        x = self._x
        _, exponent = torch.frexp(x.to(torch.float64))
        bits = exponent.to(torch.int64).clamp(max=_STATE_BITS)
        # float64 rounding can carry x = 2**k - 1 up to 2**k: correct the exponent
        power = torch.ones_like(x) << (bits - 1).clamp(min=0)
        bits = torch.where((bits > 0) & (power > x), bits - 1, bits)
        return bits + _WORD_BITS * self._depth.to(torch.int64) + 64 * len(self._wide)

    def is_empty(self) -> bool:
        """Is every push undone?  Frees the words' memory if so."""
        self._release()
        return not (self._wide or bool(self._x.any()) or bool(self._depth.any()))

    def to_ints(self) -> list[int]:
        """The digits' numbers ``X_i`` as Python ints (for tests and inspection; slow)."""
        states = self._x.tolist()
        depths = self._depth.tolist()
        rows = [c.tolist() for c in self._chunks]
        out = []
        for i, (value, depth) in enumerate(zip(states, depths)):
            for row in reversed(range(depth)):
                word = rows[row // _CHUNK_ROWS][row % _CHUNK_ROWS][i] + _WORD_OFFSET
                value = (value << _WORD_BITS) | word
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
        self.resolution = 2.0**-fraction_bits
        self.lrs = [float(v) for v in lrs]
        self.momenta = [float(v) for v in momenta]
        self.fractions = [momentum_fraction(mu, max_denominator) for mu in self.momenta]
        self.max_base = max(2, max_denominator)

    @property
    def steps(self) -> int:
        return len(self.lrs)

    @property
    def value_limit(self) -> float:
        """Magnitude a gradient, an update or an initial weight must stay below."""
        return _INPUT_LIMIT / self.scale

    def mean_bits(self) -> float:
        """:meth:`bits_per_step` averaged over the steps."""
        return sum(self.bits_per_step(t) for t in range(self.steps)) / self.steps

    def bits_per_step(self, t: int) -> float:
        """Information the multiplication of step ``t`` destroys, per weight (bits)."""
        n, d = self.fractions[t]
        if n == 0:
            return float(_WIDE_BITS)
        return math.log2(d / n)

    # ---------------------------------------------------------------- conversions

    def to_fixed(self, x: torch.Tensor, what: str, t: int | None = None) -> torch.Tensor:
        """``round(x * 2**f)`` as ``int64``, refusing NaN/inf and values out of range."""
        x64 = x.detach() if x.dtype == torch.float64 else x.detach().to(torch.float64)
        if x64.numel() == 0:
            return x64.to(torch.int64)
        scaled = torch.mul(x64, self.scale).round_()
        low, high = torch.aminmax(scaled)
        if float(low) > -_INPUT_LIMIT and float(high) < _INPUT_LIMIT:  # False for NaN too
            return scaled.to(torch.int64)
        at = "" if t is None else f" at step {t}"
        if not bool(torch.isfinite(x64).all()):
            raise HypergradientError(
                f"{self.where}: the {what}{at} contains NaN/inf: the inner training "
                f"diverged. Lower the learning rate or the number of steps."
            )
        raise HypergradientError(
            f"{self.where}: the largest magnitude in the {what}{at} is "
            f"{float(x64.abs().max()):.4g}, outside the fixed-point range "
            f"+-{self.value_limit:.4g} of fraction_bits={self.fraction_bits}. Pass "
            f"fewer fraction_bits (each one fewer doubles the "
            f"range and halves the resolution), or lower the learning rate if training "
            f"diverges."
        )

    def to_float(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x * 2**-f`` in ``dtype`` (exact in float64 while ``|x| < 2**53``)."""
        out = x.to(torch.float64).mul_(self.resolution)
        return out if dtype == torch.float64 else out.to(dtype)

    def _check_state(self, x: torch.Tensor, what: str, t: int) -> None:
        low, high = torch.aminmax(x)
        if not -_STATE_LIMIT < int(low) <= int(high) < _STATE_LIMIT:
            raise HypergradientError(
                f"{self.where}: the {what} after step {t} reaches "
                f"{float(x.abs().max()) / self.scale:.4g}, outside the fixed-point range "
                f"+-{_STATE_LIMIT / self.scale:.4g} of fraction_bits={self.fraction_bits}. Pass "
                f"fewer fraction_bits, or lower the learning rate if training diverges."
            )

    def _update(self, b: torch.Tensor, t: int) -> torch.Tensor:
        """``[eta_t * b]``: a deterministic function of the integer velocity."""
        step = b.to(torch.float64).mul_(self.lrs[t]).round_()
        low, high = torch.aminmax(step)
        if not -_INPUT_LIMIT < float(low) <= float(high) < _INPUT_LIMIT:
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
            buffer.push_wide(x)
            return torch.zeros_like(x)
        q = torch.div(x, d, rounding_mode="floor")
        r = torch.sub(x, q, alpha=d)

        def dither(u):  # z = r n + u in [0, d n): push z mod d, keep s = z // d
            z = torch.add(u, r, alpha=n)
            s = torch.div(z, d, rounding_mode="floor")
            return torch.sub(z, s, alpha=d), s

        return buffer.exchange(n, d, dither).add_(q, alpha=n)

    def _unmul(self, y: torch.Tensor, t: int, buffer: InfoBuffer) -> torch.Tensor:
        """Inverse of :meth:`_mul`."""
        n, d = self.fractions[t]
        if n == d:
            return y
        if n == 0:
            if bool(y.any()):
                raise _not_reconstructed(self.where, f"the velocity at step {t}")
            return buffer.pop_wide()
        q = torch.div(y, n, rounding_mode="floor")
        s = torch.sub(y, q, alpha=n)

        def undither(v):  # z = s d + (z mod d): push u = z mod n, keep r = z // n
            z = torch.add(v, s, alpha=d)
            r = torch.div(z, n, rounding_mode="floor")
            return torch.sub(z, r, alpha=n), r

        return buffer.exchange(d, n, undither).add_(q, alpha=d)

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
        self.step_fixed(state, self.to_fixed(grad, "gradient", t), t)

    def step_fixed(self, state: ExactState, g: torch.Tensor, t: int) -> None:
        """:meth:`step` with the gradient already on the grid (``to_fixed(grad)``)."""
        state.b = self._mul(state.b, t, state.buffer) + g
        self._check_state(state.b, "velocity", t)
        state.w = state.w - self._update(state.b, t)
        self._check_state(state.w, "weights", t)

    def undo_position(self, state: ExactState, t: int) -> None:
        """``W_{t+1} -> W_t`` (needs only ``B_{t+1}``), in place."""
        state.w = state.w + self._update(state.b, t)

    def undo_velocity(self, state: ExactState, grad: torch.Tensor, t: int) -> None:
        """``B_{t+1} -> B_t`` given the flat gradient at ``w_t`` (after :meth:`undo_position`)."""
        self.undo_velocity_fixed(state, self.to_fixed(grad, "gradient", t), t)

    def undo_velocity_fixed(self, state: ExactState, g: torch.Tensor, t: int) -> None:
        """:meth:`undo_velocity` with the gradient already on the grid."""
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
    """``hypergrad`` (shaped like ``hparams``), ``params`` (``w_T``, detached), ``stats``.

    Examples:
        >>> import torch
        >>> import hypergradient as hg
        >>> inner = lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum()
        >>> outer = lambda p, h: p["w"].sum()
        >>> w0 = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> lam = {"lam": torch.ones(2, dtype=torch.float64)}
        >>> res = hg.reversible_hypergrad(inner, outer, w0, lam, steps=10, lr=0.5, momentum=0.9)
        >>> ref = hg.unrolled_hypergrad(inner, outer, w0, lam, steps=10, lr=0.5, momentum=0.9)
        >>> bool(torch.allclose(res.hypergrad["lam"], ref["lam"], rtol=1e-10, atol=0))
        True
        >>> tuple(res.params["w"].shape), res.stats.steps, res.stats.num_weights
        ((2,), 10, 2)
        >>> res.stats.trajectory_bytes  # what reverse mode stores: 2 * P * T float64 values
        320
    """

    hypergrad: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    stats: ReversibleStats


@dataclass(frozen=True)
class _Layout:
    """Flat vector <-> dict of tensors, in a fixed key order."""

    keys: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, tree: Mapping[str, torch.Tensor]) -> _Layout:
        shapes = tuple(v.shape for v in tree.values())
        return cls(tuple(tree), shapes, tuple(math.prod(s) for s in shapes))

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def flatten(self, tree: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tree[k].reshape(-1) for k in self.keys])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = flat.split_with_sizes(self.sizes)
        return {k: p.view(s) for k, p, s in zip(self.keys, parts, self.shapes)}


class ReversibleMemoryWarning(UserWarning):
    r"""Exact reversal would store at least as much as the trajectory it avoids storing.

    The buffer grows by :math:`\log_2(1/\mu_t)` bits per weight and step, and a momentum of
    0 (or one below ``1 / (2 max_denominator)``, which rounds to 0) forgets the velocity
    completely: all 64 bits are kept.  When the mean over the steps reaches the bits of the
    weights' dtype (64 for float64: every step at momentum 0; 32 for float32), the buffer is
    no smaller than the weights of every step, and reverse mode (or truncated
    back-propagation) is the cheaper choice.

    Examples:
        >>> import warnings
        >>> import torch
        >>> import hypergradient as hg
        >>> inner = lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum()
        >>> w0 = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> lam = {"lam": torch.ones(2, dtype=torch.float64)}
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = hg.reversible_hypergrad(inner, lambda p, h: p["w"].sum(), w0, lam,
        ...                                 steps=3, lr=0.5, momentum=0.0)  # forgets all
        >>> [c.category.__name__ for c in caught]
        ['ReversibleMemoryWarning']
    """


def _warn_if_no_saving(where: str, groups: Sequence[_Group], dtype) -> None:
    steps = groups[0].sgd.steps
    num_weights = sum(g.size for g in groups)
    bits = sum(g.size * g.sgd.mean_bits() for g in groups) / num_weights
    dtype_bits = torch.finfo(dtype).bits
    if bits < dtype_bits:
        return
    zero = max(sum(n == 0 for n, _ in g.sgd.fractions) for g in groups)
    buffer_mb = bits * steps * num_weights / 8 / 1e6
    trajectory_mb = dtype_bits * steps * num_weights / 8 / 1e6
    warnings.warn(
        f"{where}: the momentum is 0 at {zero} of {steps} steps, so the reversal buffer must "
        f"hold {bits:.1f} bits per weight and step: {buffer_mb:.3g} MB for T={steps} steps "
        f"of {num_weights:,} weights, no less than storing the trajectory w_1..w_T in "
        f"{str(dtype).removeprefix('torch.')} ({trajectory_mb:.3g} MB). Exact reversal saves "
        f"no memory here: use mode='reverse' (with truncate=K to bound its memory to K "
        f"steps), or a momentum well above 0 (0.9 stores 0.152 bits per weight and step).",
        ReversibleMemoryWarning,
        stacklevel=4,  # the caller of reversible_hypergrad or unrolled_hypergrad
    )


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


def _scalar_schedule(
    where: str, name: str, fn: Callable, hparams: Mapping, steps: int, label: str | None = None
):
    """The floats ``fn(hparams, t)`` for every step, checked (``label`` names it in errors)."""
    label = name if label is None else label
    values = []
    for t in range(steps):
        value = fn(hparams, t)
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise HypergradientError(
                    f"{where}: {label} at step {t} has shape {tuple(value.shape)}; reversible "
                    f"mode needs one scalar {name} per step."
                )
            value = float(value.detach())
        value = float(value)
        if not math.isfinite(value):
            raise HypergradientError(f"{where}: {label} at step {t} is {value} (not finite).")
        if name == "momentum" and not 0.0 <= value <= 1.0:
            raise HypergradientError(
                f"{where}: {label} at step {t} is {value}; reversible mode needs momenta in "
                f"[0, 1] (the multiplication by mu is inverted with the stored bits)."
            )
        values.append(value)
    return values


# ======================================================================================
# Mini-batches: the same batch at step t in both passes, and checksums that prove it
# ======================================================================================


class SeededBatches:
    r"""A mini-batch schedule fixed by a seed: batch ``t`` is a function of ``t`` alone.

    The ``N`` examples are shuffled once per epoch, epoch :math:`e` by a generator seeded
    with ``seed`` and :math:`e`; batch :math:`t` is block :math:`t \bmod B` of epoch
    :math:`\lfloor t / B \rfloor`'s permutation, :math:`B = \lfloor N / \texttt{batch\_size}
    \rfloor` blocks of ``batch_size`` examples (the :math:`N \bmod \texttt{batch\_size}`
    examples a shuffle puts last sit that epoch out, so every batch has the same size).
    ``batches(t)`` returns the same examples bit for bit whenever and in whatever order it
    is called: what the reverse pass of :func:`reversible_hypergrad` (``batches=``) needs,
    since it recomputes the gradient of step :math:`t` on batch :math:`t`, walking the steps
    backwards.  A ``DataLoader`` iterator, or a batch drawn from the global random state,
    gives other batches the second time (and ``reversible_hypergrad`` says so).

    Args:
        *tensors: the data, e.g. ``x`` of shape ``(N, ...)`` and ``y`` of shape ``(N,)``, all
            with the same first dimension ``N >= 1``.
        batch_size: examples per batch, in ``[1, N]``.
        seed: an int >= 0; another seed gives another schedule.

    Returns (when called with a step ``t >= 0``): a tuple with one ``(batch_size, ...)``
    tensor per data tensor, on the data's device.

    Cost: one ``randperm(N)`` when the epoch changes (the last epoch's permutation is kept,
    so a forward or reverse pass draws one per epoch) plus the indexing; memory: one
    permutation (8 N bytes) besides the data.

    Examples:
        >>> import torch
        >>> from hypergradient.hypergrad import SeededBatches
        >>> x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
        >>> batches = SeededBatches(x, y, batch_size=2, seed=0)
        >>> xb, yb = batches(3)  # epoch 1, its second block
        >>> tuple(xb.shape), tuple(yb.shape), batches.batches_per_epoch
        ((2, 2), (2,), 2)
        >>> _ = [batches(t) for t in (7, 0, 5)]  # any order in between
        >>> bool(torch.equal(batches(3)[1], yb))
        True
        >>> epoch0 = batches(0)[1].tolist() + batches(1)[1].tolist()
        >>> len(set(epoch0))  # no example twice in an epoch
        4
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, seed: int = 0):
        where = "hypergradient.hypergrad.SeededBatches(...)"
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise HypergradientError(
                f"{where}: expected the data as one or more tensors with the examples along "
                f"the first dimension (e.g. SeededBatches(x, y, batch_size=100)), got "
                f"{[type(t).__name__ for t in tensors]}."
            )
        sizes = {t.shape[0] if t.dim() else None for t in tensors}
        if len(sizes) != 1 or None in sizes or 0 in sizes:
            raise HypergradientError(
                f"{where}: the tensors must share a first dimension N >= 1 (the examples), "
                f"got shapes {[tuple(t.shape) for t in tensors]}."
            )
        (n,) = sizes
        if (
            not isinstance(batch_size, int)
            or isinstance(batch_size, bool)
            or not 1 <= batch_size <= n
        ):
            raise HypergradientError(
                f"{where}: batch_size={batch_size!r}; expected an int in [1, N={n}]."
            )
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise HypergradientError(f"{where}: seed={seed!r}; expected an int >= 0.")
        self.tensors = tensors
        self.num_examples = n
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = n // batch_size
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    def indices(self, t: int) -> torch.Tensor:
        """The example indices of batch ``t`` (``int64``, shape ``(batch_size,)``)."""
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise HypergradientError(
                f"hypergradient.hypergrad.SeededBatches: the step must be an int >= 0, got {t!r}."
            )
        epoch, block = divmod(t, self.batches_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.num_examples, generator=gen)
            self._epoch = epoch
        return self._perm[block * self.batch_size : (block + 1) * self.batch_size]

    def __call__(self, t: int) -> tuple[torch.Tensor, ...]:
        idx = self.indices(t)
        return tuple(x[idx.to(x.device)] for x in self.tensors)


# An odd 64-bit multiplier (PCG's): position i weighs a byte word by (i + 1) * A mod 2**64.
_HASH_MULTIPLIER = 0x5851F42D4C957F2D  # below 2**63: an int64
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _tensor_checksum(x: torch.Tensor) -> tuple[int, int]:
    """Two sums over the bits of ``x`` (its words as integers, plain and weighted by
    position, wrapping mod 2**64): equal for equal bits; a change of one word (or a swap of
    two unequal ones) always changes them."""
    flat = x.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    ints = flat.view(_INT_OF_SIZE[flat.element_size()]).to(torch.int64)
    weights = torch.arange(1, ints.numel() + 1, dtype=torch.int64, device=ints.device)
    weights.mul_(_HASH_MULTIPLIER)
    return int(ints.sum()), int(torch.dot(ints, weights)) if ints.numel() else 0


def _batch_checksum(where: str, batch: object, t: int) -> int:
    """One int for a batch (tensors, possibly in tuples, lists or dicts, and plain values):
    dtypes, shapes and bits.  Refuses NaN/inf in floating tensors."""

    def walk(value, path):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise HypergradientError(
                    f"{where}: batches({t}){path} (shape {tuple(value.shape)}) contains {bad} "
                    f"NaN/inf value(s); clean the data before training on it."
                )
            return (str(value.dtype), tuple(value.shape), _tensor_checksum(value))
        if isinstance(value, Mapping):
            return tuple((k, walk(v, f"{path}[{k!r}]")) for k, v in value.items())
        if isinstance(value, (tuple, list)):
            return tuple(walk(v, f"{path}[{i}]") for i, v in enumerate(value))
        return repr(value)

    return hash(walk(batch, ""))


def _batch_changed(where: str, t: int) -> HypergradientError:
    return HypergradientError(
        f"{where}: batches({t}) returned another batch in the reverse pass than in the forward "
        f"pass (its checksum changed), so the gradient of step {t} cannot be recomputed. "
        f"`batches` must be a function of the step alone: index a fixed list of batches, or "
        f"draw batch t from a generator seeded by t (hg.hypergrad.SeededBatches(x, y, "
        f"batch_size=..., seed=...)), not from a DataLoader iterator or the global random "
        f"state."
    )


def check_batches(where: str, batches: object, inner_loss: Callable) -> None:
    """``batches``: None, or a callable ``t -> batch`` with an ``inner_loss`` that takes it."""
    if batches is None:
        return
    if not callable(batches):
        raise HypergradientError(
            f"{where}: batches must be a callable t -> batch (e.g. "
            f"hg.hypergrad.SeededBatches(x, y, batch_size=100, seed=0)) or None, got "
            f"{type(batches).__name__}."
        )
    _check_batched_loss(where, inner_loss)


def _check_batched_loss(where: str, inner_loss: Callable) -> None:
    try:
        signature = inspect.signature(inner_loss)
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    try:
        signature.bind(None, None, None)
    except TypeError:
        raise HypergradientError(
            f"{where}: with batches=..., inner_loss is called as inner_loss(params, hparams, "
            f"batch) with batch = batches(t), but it takes {signature}. Add the batch "
            f"argument (e.g. `def inner_loss(p, h, batch): x, y = batch; ...`)."
        ) from None


# ======================================================================================
# The hypergradient
# ======================================================================================


@dataclass
class _Group:
    """Weights that share a learning-rate and momentum schedule: one tensor, or all."""

    keys: tuple[str, ...]
    start: int
    stop: int
    lr_spec: object
    momentum_spec: object
    lr_fn: Callable
    momentum_fn: Callable
    sgd: ExactMomentumSGD
    state: ExactState | None = None

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def span(self) -> slice:
        return slice(self.start, self.stop)


def _per_tensor(where: str, name: str, spec: object, keys: Sequence[str]) -> dict | None:
    """``spec`` as ``{params key: spec}`` when it is a dict of per-tensor schedules."""
    if not isinstance(spec, Mapping):
        return None
    missing = [k for k in keys if k not in spec]
    unknown = [k for k in spec if k not in keys]
    if missing or unknown:
        problems = ([f"no entry for {missing}"] if missing else []) + (
            [f"unknown keys {unknown}"] if unknown else []
        )
        raise HypergradientError(
            f"{where}: {name} is a dict of per-tensor schedules, so its keys must be the "
            f"params' keys {list(keys)}; it has {' and '.join(problems)}. Give every tensor "
            f"its own {name} (entries may repeat a value or an hparams key)."
        )
    return dict(spec)


def reversible_hypergrad(
    inner_loss: Callable[..., torch.Tensor],
    outer_loss: Callable[[dict, dict], torch.Tensor],
    params0: ParamsInit,
    hparams: Mapping[str, torch.Tensor],
    steps: int,
    lr: StepHParam | Mapping[str, StepHParam],
    momentum: StepHParam | Mapping[str, StepHParam],
    *,
    batches: Callable[[int], object] | None = None,
    fraction_bits: int = 52,
    max_denominator: int = 2**20,
) -> ReversibleResult:
    r"""Hypergradient through ``steps`` SGD-momentum steps by exact reversal (Maclaurin 2015).

    Computes the same derivative as ``unrolled_hypergrad(..., mode="reverse")``,

    .. math::

        \frac{dE(w_T(\lambda), \lambda)}{d\lambda}, \qquad
        b_{t+1} = \mu_t b_t + \nabla_w L_t(w_t, \lambda),\;
        w_{t+1} = w_t - \eta_t b_{t+1},\; b_0 = 0,\; w_0 = w_0(\lambda),

    without storing the trajectory: the forward pass keeps :math:`w, b` as fixed-point
    integers and the bits the momentum destroys in an :class:`InfoBuffer`; the reverse pass
    rebuilds :math:`w_{T-1}, \dots, w_0` bit for bit while accumulating (adjoints
    :math:`\bar w_T = \nabla_w E`, :math:`\bar b_T = 0`, :math:`u = \bar b_{t+1} -
    \eta_t \bar w_{t+1}`)

    .. math::

        \bar\eta_t = -\bar w_{t+1} \cdot b_{t+1},\quad
        \bar\mu_t = u \cdot b_t,\quad
        \bar w_t = \bar w_{t+1} + \nabla^2_w L_t\, u,\quad
        \bar b_t = \mu_t u,\quad
        \bar\lambda \mathrel{+}= \nabla^2_{\lambda w} L_t\, u .

    **Mini-batches** (as the paper trained): with ``batches``, step :math:`t` descends
    :math:`L_t(w, \lambda) =` ``inner_loss(params, hparams, batches(t))``.  The reverse pass
    calls ``batches(t)`` again for :math:`t = T-1, \dots, 0` and must get the same batch:
    a checksum of each batch and of each fixed-point gradient (24 bytes per step in all)
    is kept from the forward pass and compared, and a batch or gradient that changed is
    reported at its step.  :class:`SeededBatches` is such a schedule.

    **Per-tensor schedules** (the paper's per-layer learning rates and momenta): ``lr`` and
    ``momentum`` may be dicts ``{params key: schedule}``; the dot products above are then
    taken over each tensor's weights, and each tensor keeps a buffer of its own.  Per-layer
    initial scales enter through ``params0`` (a callable of the hparams), per-layer decays
    through ``inner_loss``.

    Args:
        inner_loss: ``inner_loss(params, hparams) -> scalar``, or ``inner_loss(params,
            hparams, batch)`` with ``batches``; a deterministic function of its arguments
            (see the module docstring).  Per-weight regularisation and other
            hyperparameters of the training loss enter here, as for the other modes.
        outer_loss: ``outer_loss(params, hparams) -> scalar`` at ``w_T``.
        params0: the initial weights, a dict of tensors (constants), or a callable
            ``params0(hparams) -> dict`` when they depend on hyperparameters, e.g. an
            initial scale: ``lambda h: {k: h["log_scale"].exp() * v for k, v in
            w_init.items()}``.
        hparams: dict of tensors, same dtype as the weights.
        steps: ``T >= 1``.
        lr: learning rate as in :func:`~hypergradient.unrolled_hypergrad`: a float, a tensor
            (scalar or ``(T,)`` schedule), the name of an ``hparams`` key (scalar or ``(T,)``
            schedule, differentiated) or a callable ``lr(hparams, t) -> scalar tensor``; or a
            dict with one of these for every key of the params (per-tensor schedules).
        momentum: :math:`\mu`, same forms; every value in ``[0, 1]``.  Each step's value is
            applied as the nearest fraction ``n/d`` with ``d <= max_denominator``.
        batches: ``batches(t) -> batch`` for ``t`` in ``[0, T)`` (any tensors, in tuples,
            lists or dicts), the same batch every time it is called with ``t``; ``None``: a
            full-batch ``inner_loss(params, hparams)``.
        fraction_bits: fixed-point resolution :math:`2^{-f}`; weights, velocities, gradients
            and updates must stay below :math:`2^{61-f}` (512 for 52) in magnitude.
        max_denominator: the largest denominator of the momentum fractions.

    Returns:
        :class:`ReversibleResult` with ``hypergrad`` (dict shaped like ``hparams``),
        ``params`` (``w_T``) and ``stats`` (:class:`ReversibleStats`: buffer bits per weight
        and step, bytes, ...).

    Raises:
        HypergradientError: bad input (NaN included), a value outside the fixed-point range,
            a diverging run, a batch that changed between the two passes, or a reverse pass
            that failed to reconstruct a gradient or ``w_0`` (non-deterministic
            ``inner_loss``).

    Warns:
        ReversibleMemoryWarning: the momenta are so small that the buffer would hold at
            least as many bits per weight and step as the weights' dtype (momentum 0 at
            every step for float64): storing the trajectory, i.e. ``mode="reverse"``, costs
            no more memory.

    Cost: forward ``T`` gradients; reverse ``T`` gradients with ``create_graph`` plus ``T``
    backward passes through them (Hessian- and mixed-vector products), and integer
    bookkeeping that costs the same at every step, whatever ``T``; with ``batches``, two
    calls of ``batches`` per step.
    Memory: ``O(P)`` plus one step's graph plus the buffer, about ``T log2(1/mu)`` bits per
    weight (``T * 0.152`` for ``mu = 0.9``), instead of ``O(T)`` step graphs for reverse mode.

    Examples:
        >>> import torch, hypergradient as hg
        >>> # L = (w - lam)^2/2 from w0 = 0 with lr 0.5, momentum 0.5: after 2 steps
        >>> # w1 = lam/2, b2 = 0.5 * (-lam) + (-lam/2) = -lam, w2 = w1 + lam/2 = lam; E = w2
        >>> res = hg.reversible_hypergrad(lambda p, h: 0.5 * ((p["w"] - h["lam"]) ** 2).sum(),
        ...     lambda p, h: p["w"].sum(), {"w": torch.zeros(1, dtype=torch.float64)},
        ...     {"lam": torch.ones(1, dtype=torch.float64)}, steps=2, lr=0.5, momentum=0.5)
        >>> float(res.hypergrad["lam"]), float(res.params["w"])
        (1.0, 1.0)
        >>> # Mini-batches and per-tensor learning rates: L_t = (w - x_t)^2/2 with x_t the
        >>> # mean of batch t; one step from w0 = 0 gives w1 = lr_w * x_0, so dE/dlr_w = x_0
        >>> x = torch.arange(4.0, dtype=torch.float64)
        >>> batches = hg.hypergrad.SeededBatches(x, batch_size=2, seed=0)
        >>> res = hg.reversible_hypergrad(
        ...     lambda p, h, batch: 0.5 * ((p["w"] - batch[0].mean()) ** 2).sum(),
        ...     lambda p, h: p["w"].sum(), {"w": torch.zeros(1, dtype=torch.float64)},
        ...     {"lr_w": torch.tensor(0.5, dtype=torch.float64)}, steps=1,
        ...     lr={"w": "lr_w"}, momentum={"w": 0.9}, batches=batches)
        >>> bool(res.hypergrad["lr_w"] == batches(0)[0].mean())
        True

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
        batches=batches,
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
    batches=None,
    fraction_bits: int = 52,
    max_denominator: int = 2**20,
    where: str = _WHERE,
) -> ReversibleResult:
    check_callable(where, "inner_loss", inner_loss)
    check_callable(where, "outer_loss", outer_loss)
    check_batches(where, batches, inner_loss)
    init = None
    if callable(params0) and not isinstance(params0, Mapping):
        check_tree(where, "hparams", hparams)
        init, params0 = params0, initial_params(where, params0, hparams)
    dtype = check_params_hparams(where, params0, hparams, params_name="params0")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise HypergradientError(f"{where}: steps must be an int >= 1, got {steps!r}.")
    layout = _Layout.of(params0)
    hp = {k: v.detach() for k, v in hparams.items()}

    # ---- one group of weights per schedule: all of them, or one per tensor
    lr_map = _per_tensor(where, "lr", lr, layout.keys)
    momentum_map = _per_tensor(where, "momentum", momentum, layout.keys)
    if lr_map is None and momentum_map is None:
        members = [(layout.keys, lr, momentum, "")]
    else:
        members = [
            (
                (k,),
                lr if lr_map is None else lr_map[k],
                momentum if momentum_map is None else momentum_map[k],
                f"[{k!r}]",
            )
            for k in layout.keys
        ]
    offsets = dict(zip(layout.keys, itertools.accumulate((0, *layout.sizes))))
    groups: list[_Group] = []
    for keys, lr_spec, momentum_spec, label in members:
        start = offsets[keys[0]]
        stop = offsets[keys[-1]] + layout.sizes[layout.keys.index(keys[-1])]
        lr_fn = resolve_step_hparam(f"lr{label}", lr_spec, hparams, steps, dtype, where=where)
        momentum_fn = resolve_step_hparam(
            f"momentum{label}", momentum_spec, hparams, steps, dtype, where=where
        )
        sgd = ExactMomentumSGD(
            _scalar_schedule(where, "lr", lr_fn, hp, steps, f"lr{label}"),
            _scalar_schedule(where, "momentum", momentum_fn, hp, steps, f"momentum{label}"),
            fraction_bits=fraction_bits,
            max_denominator=max_denominator,
            where=where,
        )
        if stop > start:  # a tensor without elements has nothing to train
            groups.append(
                _Group(keys, start, stop, lr_spec, momentum_spec, lr_fn, momentum_fn, sgd)
            )
    if not groups:
        raise HypergradientError(f"{where}: params0 has no elements to train.")
    _warn_if_no_saving(where, groups, dtype)
    grid = groups[0].sgd  # every group has the same fixed-point grid

    def gradient(w_flat, hp_, batch, create_graph):
        """``(flat gradient, leaf, loss)`` at ``w_flat``: ``inner_loss`` sees views of one
        flat leaf, so the gradient (and a Hessian-vector product through its graph) comes
        out flat."""
        leaf = w_flat.detach().requires_grad_(True)
        with torch.enable_grad():
            params = layout.unflatten(leaf)
            loss = inner_loss(params, hp_) if batches is None else inner_loss(params, hp_, batch)
            (g,) = torch.autograd.grad(loss, [leaf], create_graph=create_graph, allow_unused=True)
        return (torch.zeros_like(leaf) if g is None else g), leaf, loss

    def weights() -> torch.Tensor:
        """The float weights of the current integer state, flat."""
        if len(groups) == 1:
            return grid.to_float(groups[0].state.w, dtype)
        return torch.cat([grid.to_float(g.state.w, dtype) for g in groups])

    def batch_at(t):
        return None if batches is None else batches(t)

    # ---- forward: T gradients, integer state, nothing of the trajectory kept but checksums
    hp_req = {k: v.detach().requires_grad_(True) for k, v in hparams.items()}
    w0_flat = layout.flatten(params0).detach()
    for g in groups:
        g.state = g.sgd.init(w0_flat[g.span])
    w0_fixed = [g.state.w.clone() for g in groups]
    # 24 bytes per step: one int64 per batch, two per fixed-point gradient
    batch_sums = torch.zeros(steps if batches is not None else 0, dtype=torch.int64)
    gradient_sums = torch.zeros(steps, 2, dtype=torch.int64)
    for t in range(steps):
        batch = batch_at(t)
        if batches is not None:
            batch_sums[t] = _batch_checksum(where, batch, t)
        # hp_req in both passes: the forward gradients must be bitwise those the reverse
        # pass recomputes, so both evaluate inner_loss on the same kind of inputs.
        grad, _, loss = gradient(weights(), hp_req, batch, create_graph=False)
        if t == 0:
            check_loss_dtype(
                where, "inner_loss", check_scalar_loss(where, "inner_loss", loss), dtype
            )
        fixed = grid.to_fixed(grad, "gradient", t)
        gradient_sums[t] = torch.tensor(_tensor_checksum(fixed))
        for g in groups:
            g.sgd.step_fixed(g.state, fixed[g.span], t)
    bit_lengths = torch.cat([g.state.buffer.bit_lengths() for g in groups])
    buffer_bits = int(bit_lengths.sum())
    idle_weights = int((bit_lengths == 0).sum())
    buffer_bytes = sum(g.state.buffer.peak_bytes for g in groups)

    # ---- the outer loss at w_T
    w_final = weights().requires_grad_(True)
    with torch.enable_grad():
        value = outer_loss(layout.unflatten(w_final), hp_req)
        value = check_scalar_loss(where, "outer_loss", value)
        check_loss_dtype(where, "outer_loss", value, dtype)
        grads = torch.autograd.grad(value, [w_final, *hp_req.values()], allow_unused=True)
    dw = torch.zeros_like(w_final) if grads[0] is None else grads[0]
    db = torch.zeros_like(dw)
    d_hp: dict[str, torch.Tensor | None] = dict(zip(hp_req, grads[1:]))
    minus_d_lr = torch.empty(len(groups), steps, dtype=dtype, device=dw.device)
    d_mom = torch.empty(len(groups), steps, dtype=dtype, device=dw.device)

    def joined(parts: list[torch.Tensor]) -> torch.Tensor:
        """The groups' parts as one flat vector."""
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # ---- reverse: rebuild w_t, b_t exactly and accumulate the adjoints
    hp_list = list(hp_req.values())
    for t in reversed(range(steps)):
        for i, g in enumerate(groups):
            torch.dot(dw[g.span], grid.to_float(g.state.b, dtype), out=minus_d_lr[i, t])
        u = joined([torch.sub(db[g.span], dw[g.span], alpha=g.sgd.lrs[t]) for g in groups])
        for g in groups:
            g.sgd.undo_position(g.state, t)
        batch = batch_at(t)
        if batches is not None and _batch_checksum(where, batch, t) != int(batch_sums[t]):
            raise _batch_changed(where, t)
        grad, leaf, _ = gradient(weights(), hp_req, batch, True)
        fixed = grid.to_fixed(grad.detach(), "gradient", t)
        if list(_tensor_checksum(fixed)) != gradient_sums[t].tolist():
            raise _not_reconstructed(where, f"the gradient of step {t}")
        for g in groups:
            g.sgd.undo_velocity_fixed(g.state, fixed[g.span], t)
        # One backward through the gradient graph: H u (w.r.t. w) and the mixed term (hparams)
        if grad.requires_grad:
            outs = torch.autograd.grad(grad, [leaf, *hp_list], grad_outputs=u, allow_unused=True)
            for k, o in zip(hp_req, outs[1:]):
                if o is not None:
                    d_hp[k] = o if d_hp[k] is None else d_hp[k] + o
            if outs[0] is not None:
                dw = dw + outs[0]
        for i, g in enumerate(groups):
            torch.dot(u[g.span], grid.to_float(g.state.b, dtype), out=d_mom[i, t])
        db = joined([g.sgd.momenta[t] * u[g.span] for g in groups])

    for g, w0 in zip(groups, w0_fixed):
        if not torch.equal(g.state.w, w0) or bool(g.state.b.any()) or not g.state.buffer.is_empty():
            raise _not_reconstructed(where, "the initial weights and velocity")
    d_lr = -minus_d_lr

    # ---- the learning rates, momenta and initial weights as functions of the hparams
    def add(key, value):
        d_hp[key] = value if d_hp[key] is None else d_hp[key] + value

    terms: list[torch.Tensor] = []

    def flush() -> None:
        """Chain rule for the terms so far: their graphs are freed after each chunk, so a
        callable schedule costs O(1) memory per step, not O(T)."""
        if terms:
            outs = torch.autograd.grad(torch.stack(terms).sum(), hp_list, allow_unused=True)
            for k, o in zip(hp_req, outs):
                if o is not None:
                    add(k, o)
            terms.clear()

    with torch.enable_grad():
        for i, g in enumerate(groups):
            for spec, fn, adjoint in (
                (g.lr_spec, g.lr_fn, d_lr[i]),
                (g.momentum_spec, g.momentum_fn, d_mom[i]),
            ):
                if isinstance(spec, str):  # hparams[spec] is the schedule (or one value)
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
                        if len(terms) == _CHAIN_CHUNK:
                            flush()
        if init is not None:
            w0 = init(hp_req)
            terms.extend(
                (v * part).sum()
                for v, part in zip((w0[k] for k in layout.keys), layout.unflatten(dw).values())
                if isinstance(v, torch.Tensor) and v.requires_grad
            )
        flush()
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
        expected_bits_per_weight_per_step=sum(g.size * g.sgd.mean_bits() for g in groups)
        / num_weights,
        buffer_bytes=buffer_bytes,
        trajectory_bytes=2 * num_weights * steps * w0_flat.element_size(),
        momentum_max_error=max(
            abs(mu - n / d) for g in groups for mu, (n, d) in zip(g.sgd.momenta, g.sgd.fractions)
        ),
        fraction_bits=fraction_bits,
    )
    params_t = layout.unflatten(w_final.detach())
    hypergrad = {k: v.detach() for k, v in d_hp.items() if v is not None}
    return ReversibleResult(hypergrad=hypergrad, params=params_t, stats=stats)
