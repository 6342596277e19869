r"""A data-augmentation *network* whose every weight is a hyperparameter (Lorraine et al. 2020).

The training loss sees augmented images :math:`a_\phi(x, \varepsilon)` produced by a small
network with weights :math:`\phi` (the hyperparameters) and random noise
:math:`\varepsilon`; the validation loss sees clean images only.  The hypergradient
:math:`dE/d\phi` therefore has no direct term: it flows only through the training loss's
mixed derivative :math:`\partial^2 L/\partial\phi\,\partial w`, i.e. through how the augmented
examples move the model's weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .._errors import HypergradientError
from ._base import AbstractHyperparameter, per_example_loss

_TRANSFORMS = ("affine", "residual", "both")
_PREFIX = "aug."
# the initial weights are drawn in float32 whatever the default dtype (same values everywhere)
_F32 = {"dtype": torch.float32}


class _AffineNet(nn.Module):
    """(noise, 7x7 thumbnail of the image) -> 6 affine coefficients, added to the identity."""

    def __init__(self, channels: int, noise_dim: int, hidden: int, max_warp: float):
        super().__init__()
        self.max_warp = max_warp
        self.hidden = nn.Linear(noise_dim + channels * 49, hidden, **_F32)
        self.out = nn.Linear(hidden, 6, **_F32)
        nn.init.zeros_(self.out.weight)  # start at the identity warp
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, noise: torch.Tensor, return_theta: bool = False):
        thumb = F.adaptive_avg_pool2d(x, 7).flatten(1)
        h = torch.tanh(self.hidden(torch.cat([noise, thumb], dim=1)))
        eye = torch.eye(2, 3, dtype=x.dtype, device=x.device)
        theta = eye + self.max_warp * torch.tanh(self.out(h)).view(-1, 2, 3)
        if return_theta:
            return theta
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


class _ResidualNet(nn.Module):
    """(image, noise channels) -> image + bounded residual, by three 3x3 convolutions."""

    def __init__(self, channels: int, noise_channels: int, width: int, max_change: float):
        super().__init__()
        self.max_change = max_change
        self.c1 = nn.Conv2d(channels + noise_channels, width, 3, padding=1, **_F32)
        self.c2 = nn.Conv2d(width, width, 3, padding=1, **_F32)
        self.c3 = nn.Conv2d(width, channels, 3, padding=1, **_F32)
        nn.init.zeros_(self.c3.weight)  # start at the identity map
        nn.init.zeros_(self.c3.bias)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c1(torch.cat([x, noise], dim=1)))
        h = torch.relu(self.c2(h))
        return x + self.max_change * torch.tanh(self.c3(h))


class _AugmentModule(nn.Module):
    def __init__(self, channels, transform, noise_dim, hidden, max_change, max_warp):
        super().__init__()
        self.affine = (
            _AffineNet(channels, noise_dim, hidden, max_warp)
            if transform in ("affine", "both")
            else None
        )
        self.residual = (
            _ResidualNet(channels, noise_dim, hidden, max_change)
            if transform in ("residual", "both")
            else None
        )


@dataclass
class AugmentationNet(AbstractHyperparameter):
    r"""Learned data augmentation: a small network's weights are the hyperparameters.

    Training loss on a batch ``(x, y)`` (``c`` = ``clean_weight``):

    .. math::

        L(w, \phi) = c\,\overline{\ell(f_w(x), y)}
            + (1 - c)\,\overline{\ell(f_w(a_\phi(x, \varepsilon)), y)},
        \qquad \varepsilon \sim \mathcal N(0, I)\ \text{fresh at every call}

    where the bar is the batch mean.  The augmentation :math:`a_\phi` is one of

    * ``"affine"`` - a learned spatial transformer: a one-hidden-layer MLP (tanh) reads the
      noise vector (``noise_dim`` numbers per image) and a 7x7 thumbnail of the image and
      outputs an affine warp ``identity + max_warp * tanh(.)`` (six coefficients, in
      ``affine_grid``'s normalised coordinates) applied with bilinear ``grid_sample``.  It
      can learn a *distribution* of per-image shifts, rotations, scalings and shears (the
      spread comes from the noise), i.e. label-preserving geometric augmentation, and also
      image-dependent, deterministic warps.  The ``tanh`` bound keeps a too-large hyper
      learning rate from warping the digits out of the frame (blank images give a constant
      loss: the hypergradient then vanishes and never recovers).  Cost: negligible next to
      the classifier (``(noise_dim + 49 C + 7) * hidden + 6`` weights, one bilinear
      resampling per image).
    * ``"residual"`` - an image-to-image network (three 3x3 convolutions of width ``hidden``
      reading the image and ``noise_dim`` noise channels) adding a residual bounded by
      ``max_change`` per pixel (``tanh``).  It can learn intensity changes, strokes, blur
      and noise patterns - and, being expressive, can also write validation-set information
      into the training images (warm-start bilevel optimisation rewards this; Vicol et al.
      2022).  It does not keep the training loss away from zero, though: once the
      classifier fits the augmented training set, the training gradients and with them the
      hypergradient vanish (what we saw with 500 MNIST images and an MLP).  Cost: about
      ``9 hidden (hidden + C + noise_dim + C)`` multiply-adds per pixel.
    * ``"both"`` - the residual network, then the affine warp.

    Both start at the identity (their last layer is zero), so the first training steps are
    plain training on duplicated data.  The training loss costs one extra forward/backward
    of the classifier per step (the clean and the augmented copy of the batch; with
    ``clean_weight=0`` only the augmented one).  Memory: the augmentation net's weights
    (kilobytes) and one augmented copy of the batch.

    Args:
        image_shape: ``(C, H, W)`` of one image.  Inputs may be images ``(B, C, H, W)`` or
            flattened rows ``(B, C*H*W)`` (reshaped for the augmentation and back).
        transform: ``"affine"``, ``"residual"`` or ``"both"``.
        noise_dim: noise numbers per image (affine) / noise channels per pixel (residual);
            0 makes the augmentation deterministic.
        hidden: width of the augmentation net (hidden units / convolution channels).
        max_change: bound of the residual per pixel (``"residual"`` and ``"both"``).
        max_warp: bound of every affine coefficient's change from the identity
            (``"affine"`` and ``"both"``); 0.5 allows shifts up to a quarter of the image.
        clean_weight: weight ``c`` of the clean term in ``[0, 1)`` (``c = 1`` would leave the
            augmentation unused: no hypergradient).
        init_scale: the initial weights are PyTorch's default initialisation times this.
        seed: seeds the initial weights (independent of the global RNG).

    Hyperparameter names are ``"aug.<module parameter name>"``.  The validation loss never
    sees augmented images, so the hypergradient has no direct term: implicit methods get it
    from the mixed product :math:`-(\partial^2 L/\partial\phi\,\partial w)\,H^{-1}\nabla_w E`
    (one backward pass through the classifier *and* the augmentation net), unrolled ones by
    back-propagating through the training steps.  A hypergradient therefore costs about as
    much as for a per-weight regulariser plus one pass through the augmentation net.

    Because the noise is drawn from the global torch RNG, fix ``torch.manual_seed`` before
    a call to get a deterministic loss (the trainer's checkpoints save that RNG).

    Examples:
        >>> import torch
        >>> from hypergradient.hparams.augment import AugmentationNet
        >>> kind = AugmentationNet(image_shape=(1, 28, 28), transform="affine")
        >>> hparams = kind.init({"w": torch.zeros(1)})  # the dtype of the model's weights
        >>> sum(v.numel() for v in hparams.values())
        1926
        >>> x = torch.rand(4, 1, 28, 28)
        >>> float((kind.augment(hparams, x) - x).abs().max()) < 1e-5  # starts at the identity
        True
    """

    image_shape: Sequence[int] = (1, 28, 28)
    transform: str = "affine"
    noise_dim: int = 4
    hidden: int = 32
    max_change: float = 0.5
    max_warp: float = 0.5
    clean_weight: float = 0.5
    init_scale: float = 1.0
    seed: int = 0
    _module: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        shape = tuple(self.image_shape)
        if len(shape) != 3 or any(not isinstance(s, int) or s < 1 for s in shape):
            raise HypergradientError(
                f"AugmentationNet(image_shape={self.image_shape!r}): expected (C, H, W), three "
                f"positive ints, e.g. (1, 28, 28)."
            )
        self.image_shape = shape
        if self.transform not in _TRANSFORMS:
            raise HypergradientError(
                f"AugmentationNet(transform={self.transform!r}): expected one of "
                f"{list(_TRANSFORMS)}."
            )
        for name, minimum in (("noise_dim", 0), ("hidden", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise HypergradientError(
                    f"AugmentationNet({name}={value!r}): expected an int >= {minimum}."
                )
        ok = isinstance(self.clean_weight, (int, float)) and 0 <= self.clean_weight < 1
        if not ok:
            raise HypergradientError(
                f"AugmentationNet(clean_weight={self.clean_weight!r}): expected a number in "
                f"[0, 1); with 1 the augmented term vanishes and so does the hypergradient."
            )
        for name in ("max_change", "max_warp", "init_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise HypergradientError(
                    f"AugmentationNet({name}={value!r}): expected a positive number."
                )

    # ------------------------------------------------------------------ the network
    def module(self) -> nn.Module:
        """The internal ``nn.Module`` (its own weights are placeholders; the hyperparameter
        tensors are swapped in by :func:`torch.func.functional_call`)."""
        if self._module is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self._module = _AugmentModule(
                    self.image_shape[0], self.transform, self.noise_dim, self.hidden,
                    float(self.max_change), float(self.max_warp),
                )  # fmt: skip
        return self._module

    def init(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = next(iter(params.values())).dtype if params else torch.get_default_dtype()
        out = {}
        for k, v in self.module().named_parameters():
            out[_PREFIX + k] = (v.detach() * self.init_scale).to(dtype).clone()
        return out

    def sample_noise(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Noise for a batch of images ``x`` ``(B, C, H, W)``: ``(B, noise_dim)`` for the
        affine net, ``(B, noise_dim, H, W)`` for the residual net (a dict for ``"both"``)."""
        b, (_, h, w) = x.shape[0], self.image_shape
        kw = dict(dtype=x.dtype, device=x.device, generator=generator)
        noise = {}
        if self.transform in ("affine", "both"):
            noise["affine"] = torch.randn(b, self.noise_dim, **kw)
        if self.transform in ("residual", "both"):
            noise["residual"] = torch.randn(b, self.noise_dim, h, w, **kw)
        return noise

    def augment(
        self,
        hparams: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        noise: Mapping[str, torch.Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The augmented batch ``a_phi(x, noise)``, same shape as ``x``; a pure function of
        ``hparams`` (differentiable) given the noise (drawn from ``generator`` or the global
        RNG when ``None``)."""
        flat = x.dim() == 2
        images = x.reshape(len(x), *self.image_shape) if flat else x
        if images.shape[1:] != self.image_shape:
            raise HypergradientError(
                f"AugmentationNet.augment: inputs of shape {tuple(x.shape)} do not hold images "
                f"of shape image_shape={self.image_shape}."
            )
        if noise is None:
            noise = self.sample_noise(images, generator)
        out = self._apply(hparams, images, noise, return_theta=False)
        return out.reshape(x.shape) if flat else out

    def affine_warps(
        self,
        hparams: Mapping[str, torch.Tensor],
        x: torch.Tensor,
        noise: Mapping[str, torch.Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The per-image affine warps ``theta`` ``(B, 2, 3)`` of ``"affine"``/``"both"``
        (``identity + A``, in ``affine_grid``'s normalised coordinates: a translation of
        ``2 / W`` is one pixel)."""
        if self.transform == "residual":
            raise HypergradientError(
                "AugmentationNet.affine_warps: transform='residual' has no affine warp."
            )
        images = x.reshape(len(x), *self.image_shape)
        if noise is None:
            noise = self.sample_noise(images, generator)
        return self._apply(hparams, images, noise, return_theta=True)

    def _apply(self, hparams, images, noise, *, return_theta):
        weights = {k[len(_PREFIX) :]: v for k, v in hparams.items() if k.startswith(_PREFIX)}
        module = self.module()
        out = images
        if module.residual is not None:
            sub = {k[len("residual.") :]: v for k, v in weights.items() if k.startswith("resid")}
            out = functional_call(module.residual, sub, (out, noise["residual"]))
        if module.affine is not None:
            sub = {k[len("affine.") :]: v for k, v in weights.items() if k.startswith("affine")}
            out = functional_call(module.affine, sub, (out, noise["affine"], return_theta))
        return out

    # ------------------------------------------------------------------ the kind's contract
    def training_loss(self, forward, params, hparams, batch, criterion=F.cross_entropy):
        x, y = batch[0], batch[1]
        augmented = self.augment(hparams, x)
        aug_term = per_example_loss(criterion, forward(params, augmented), y).mean()
        c = float(self.clean_weight)
        if c == 0:
            return aug_term
        clean_term = per_example_loss(criterion, forward(params, x), y).mean()
        return c * clean_term + (1 - c) * aug_term

    def describe(self, hparams):
        total = sum(float(torch.sum(v.detach().double() ** 2)) for v in hparams.values())
        return {"aug_weight_norm": math.sqrt(total)}
