"""Dataset distillation building blocks: pure torch functions, no file I/O, no Prefect.

What is here, and which paper each piece follows (checked against the authors' code):

* ``convnet`` — the ConvNet of DC/DSA/DM (Zhao & Bilen; VICO-UoE/DatasetCondensation ``networks.ConvNet``):
  ``depth`` × [conv 3×3 (padding 1; padding 3 on the first layer of a one-channel input, so 28 px becomes 32 px),
  instance norm (``GroupNorm(width, width, affine=True)``), ReLU, 2×2 average pooling], then one linear classifier.
  ``embed(x)`` returns the flattened features before the classifier, the features DM and NCFM match.
  Defaults are the papers' ConvNet-3: width 128, depth 3, instancenorm, avgpool.

* ``dsa_augment`` — Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021; ``DiffAugment`` in the same repo):
  operations ``color`` (brightness, saturation, contrast), ``crop`` (pad-and-shift by 1/8 of the side), ``cutout``
  (a zeroed square of half the side), ``flip`` (horizontal, p = 0.5), ``scale`` (per-axis factor in [1/1.2, 1.2])
  and ``rotate`` (±15°), with the reference ratios. In mode ``"S"`` (the reference default) one operation of the
  strategy is drawn per call; mode ``"M"`` applies them all in order. *Siamese*: with ``siamese=True`` one set of
  parameters is drawn from ``seed`` and applied to every image of the batch, so calling it with the same seed on a
  real and a synthetic batch applies the very same transformation to both (as the reference does, where the
  Siamese flag broadcasts the first image's parameters over the batch). With ``siamese=False`` every image gets its
  own parameters (the reference's model-training mode). Parameters come from a private ``torch.Generator`` seeded
  with ``seed``: the global RNG is never touched, and the result is a pure function of (x, seed).

* ``dm_loss`` — Distribution Matching (Zhao & Bilen, WACV 2023): ‖mean φ(real) − mean φ(syn)‖² on the features of
  a randomly initialised network, per class (the caller sums over classes). Lower = better matched.

* ``cf_loss`` / ``sample_frequencies`` — the characteristic-function discrepancy of NCFM (Wang et al.,
  "Dataset Distillation with Neural Characteristic Function: A Minmax Perspective", CVPR 2025; gszfwsb/NCFM
  ``NCFM/NCFM.py`` ``CFLossFunc``). For frequency vectors tᵢ, the empirical CF Φ(t) = mean_x exp(i tᵀx) of each
  feature set gives amplitude |Φ| and phase; per frequency
  d(t) = sqrt(α (|Φ_r| − |Φ_s|)² + β · 2(|Φ_r||Φ_s| − Re Φ_r Re Φ_s − Im Φ_r Im Φ_s)),
  the loss is the mean of d over the frequencies. The second term is 2|Φ_r||Φ_s|(1 − cos Δphase): the phase
  term. Note α·amp² + β·phase with α = β = 1 equals |Φ_r − Φ_s|², the plain CF distance. As in the reference,
  features are L2-normalised before the CF is taken and frequencies are drawn t ~ N(0, σ² I) afresh each step
  (σ = ``freq_scale``, 1 in the reference). NCFM's learned sampling network (the "max" player that picks t to
  maximise the discrepancy) is *not* implemented: ``cf_loss`` accepts any ``t``, so one can be plugged in.
  Lower = better matched.

* ``flip_concat`` — FYI (Son et al., "FYI: Flip Your Images for Dataset Distillation", ECCV 2024;
  cvlab-yonsei/FYI ``BatchAug``). Real datasets show *bilateral equivalence*: an object part seen on the left of one
  image is as likely to be on the right of another. Matching a synthetic image against such data pushes it to copy
  discriminative parts onto both halves. FYI concatenates every synthetic batch with its horizontal mirror before
  augmentation and matching, so each image only needs to carry one orientation (its mirror supplies the other) and
  can spend its pixels on more detail. In FYI's DM code this is the only change; the training objective, network
  and evaluation are unchanged. Here it is the ``flip`` option of the pixel methods.

Orientation: every loss here is a discrepancy; lower means the synthetic set is closer to the real one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DSAParams",
    "DSA_STRATEGY",
    "ConvNet",
    "convnet",
    "dsa_augment",
    "dm_loss",
    "cf_loss",
    "sample_frequencies",
    "flip_concat",
]

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAParams:
    """The reference ParamDiffAug ratios."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


# --------------------------------------------------------------------------------------------------- ConvNet
class ConvNet(nn.Module):
    """DC/DSA/DM ConvNet: depth × [conv3×3, instance norm, ReLU, avgpool 2], then a linear classifier."""

    def __init__(self, channels: int, num_classes: int, *, width: int = 128, depth: int = 3, image_size: int = 32,
                 norm: str = "instancenorm", pooling: str = "avgpooling") -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"ConvNet needs depth >= 1 and width >= 1, got depth={depth}, width={width}")
        layers: list[nn.Module] = []
        side = image_size
        in_ch = channels
        for d in range(depth):
            pad = 3 if (channels == 1 and d == 0) else 1
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=pad))
            if d == 0 and channels == 1:
                side += 4
            if norm == "instancenorm":
                layers.append(nn.GroupNorm(width, width, affine=True))
            elif norm == "batchnorm":
                layers.append(nn.BatchNorm2d(width))
            elif norm != "none":
                raise ValueError(f"unknown norm {norm!r}: use instancenorm, batchnorm or none")
            layers.append(nn.ReLU(inplace=True))
            if pooling == "avgpooling":
                layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
                side //= 2
            elif pooling == "maxpooling":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                side //= 2
            elif pooling != "none":
                raise ValueError(f"unknown pooling {pooling!r}")
            in_ch = width
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for depth {depth}")
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features before the classifier (what DM and NCFM match)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def convnet(channels: int, num_classes: int, *, width: int = 128, depth: int = 3, image_size: int = 32,
            norm: str = "instancenorm", seed: int | None = None) -> ConvNet:
    """A freshly initialised ConvNet (PyTorch default init, as the reference); ``seed`` makes the init reproducible
    without touching the global RNG's state afterwards."""
    if seed is None:
        return ConvNet(channels, num_classes, width=width, depth=depth, image_size=image_size, norm=norm)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return ConvNet(channels, num_classes, width=width, depth=depth, image_size=image_size, norm=norm)
    finally:
        torch.random.set_rng_state(state)


# ------------------------------------------------------------------------------------------------------- DSA
def _draw(gen: torch.Generator, n: int, siamese: bool) -> torch.Tensor:
    """n uniforms in [0, 1); siamese: one value repeated n times."""
    u = torch.rand(1 if siamese else n, generator=gen)
    return u.expand(n).clone() if siamese else u


def _draw_int(gen: torch.Generator, low: int, high: int, n: int, siamese: bool) -> torch.Tensor:
    v = torch.randint(low, high, (1 if siamese else n,), generator=gen)
    return v.expand(n).clone() if siamese else v


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _op_scale(x, gen, p: DSAParams, siamese):
    n, r = x.shape[0], p.ratio_scale
    sx = _draw(gen, n, siamese) * (r - 1.0 / r) + 1.0 / r
    sy = _draw(gen, n, siamese) * (r - 1.0 / r) + 1.0 / r
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sx
    theta[:, 1, 1] = sy
    return _affine(x, theta)


def _op_rotate(x, gen, p: DSAParams, siamese):
    n = x.shape[0]
    ang = (_draw(gen, n, siamese) - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(ang)
    theta[:, 0, 1] = -torch.sin(ang)
    theta[:, 1, 0] = torch.sin(ang)
    theta[:, 1, 1] = torch.cos(ang)
    return _affine(x, theta)


def _op_flip(x, gen, p: DSAParams, siamese):
    f = (_draw(gen, x.shape[0], siamese) < p.prob_flip).to(x.device).view(-1, 1, 1, 1)
    return torch.where(f, x.flip(3), x)


def _op_color(x, gen, p: DSAParams, siamese):
    n = x.shape[0]
    b = _draw(gen, n, siamese).to(x.device, x.dtype).view(-1, 1, 1, 1)
    x = x + (b - 0.5) * p.brightness
    s = _draw(gen, n, siamese).to(x.device, x.dtype).view(-1, 1, 1, 1)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (s * p.saturation) + mean_c
    c = _draw(gen, n, siamese).to(x.device, x.dtype).view(-1, 1, 1, 1)
    mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean_all) * (c + p.contrast) + mean_all


def _op_crop(x, gen, p: DSAParams, siamese):
    n, _, h, w = x.shape
    sh, sw = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    tx = _draw_int(gen, -sh, sh + 1, n, siamese).to(x.device)
    ty = _draw_int(gen, -sw, sw + 1, n, siamese).to(x.device)
    # Shift by (tx, ty) with zero fill: the reference pads by one pixel and clamps indices into the pad.
    rows = (torch.arange(h, device=x.device).view(1, h) + tx.view(n, 1) + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device).view(1, w) + ty.view(n, 1) + 1).clamp(0, w + 1)
    xp = F.pad(x, [1, 1, 1, 1])
    bidx = torch.arange(n, device=x.device).view(n, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bidx, rows.view(n, h, 1), cols.view(n, 1, w)]
    return out.permute(0, 3, 1, 2)


def _op_cutout(x, gen, p: DSAParams, siamese):
    n, _, h, w = x.shape
    ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    ox = _draw_int(gen, 0, h + (1 - ch % 2), n, siamese).to(x.device)
    oy = _draw_int(gen, 0, w + (1 - cw % 2), n, siamese).to(x.device)
    r = torch.arange(h, device=x.device).view(1, h)
    c = torch.arange(w, device=x.device).view(1, w)
    r0 = (ox - ch // 2).view(n, 1)
    c0 = (oy - cw // 2).view(n, 1)
    in_r = (r >= r0) & (r < r0 + ch)  # rows covered by the square (clipped at the border, as the reference's clamp)
    in_c = (c >= c0) & (c < c0 + cw)
    mask = ~(in_r.view(n, h, 1) & in_c.view(n, 1, w))
    return x * mask.unsqueeze(1).to(x.dtype)


_OP_FNS = {"color": _op_color, "crop": _op_crop, "cutout": _op_cutout, "flip": _op_flip,
           "scale": _op_scale, "rotate": _op_rotate}


def dsa_augment(x: torch.Tensor, *, seed: int, siamese: bool = True, strategy: str = DSA_STRATEGY,
                mode: str = "S", params: DSAParams = DSAParams()) -> torch.Tensor:
    """Differentiable Siamese Augmentation of a batch ``x`` (N, C, H, W); differentiable w.r.t. ``x``.

    ``strategy``: underscore-separated operations from color, crop, cutout, flip, scale, rotate ("" or "none": identity).
    ``mode``: "S" draws one operation per call (reference default), "M" applies every operation in order.
    ``siamese=True``: one parameter set for the whole batch, a pure function of ``seed`` — call it with the same seed on
    the real and the synthetic batch to transform both identically. ``siamese=False``: per-image parameters.
    """
    if strategy in ("", "none", "None"):
        return x
    ops = strategy.split("_")
    unknown = [o for o in ops if o not in _OPS]
    if unknown:
        raise ValueError(f"unknown DSA operations {unknown}; known: {list(_OPS)}")
    if mode not in ("S", "M"):
        raise ValueError(f"DSA mode must be 'S' or 'M', got {mode!r}")
    gen = torch.Generator().manual_seed(int(seed))
    if mode == "S":
        ops = [ops[int(torch.randint(0, len(ops), (1,), generator=gen))]]
    for op in ops:
        x = _OP_FNS[op](x, gen, params, siamese)
    return x.contiguous()


# ----------------------------------------------------------------------------------------------------- losses
def dm_loss(feat_real: torch.Tensor, feat_syn: torch.Tensor) -> torch.Tensor:
    """DM: squared L2 distance between the mean real and mean synthetic feature (one class). Lower = closer."""
    if feat_real.ndim != 2 or feat_syn.ndim != 2 or feat_real.shape[1] != feat_syn.shape[1]:
        raise ValueError(f"features must be (n, d) with the same d, got {tuple(feat_real.shape)} and {tuple(feat_syn.shape)}")
    return ((feat_real.mean(0) - feat_syn.mean(0)) ** 2).sum()


def sample_frequencies(n: int, dim: int, *, generator: torch.Generator | None = None, scale: float = 1.0,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NCFM's frequency arguments: n vectors t ~ N(0, scale² I_dim), drawn on the CPU from ``generator``."""
    if n < 1 or dim < 1:
        raise ValueError(f"need n >= 1 and dim >= 1, got n={n}, dim={dim}")
    t = torch.randn(n, dim, generator=generator) * scale
    return t.to(device=device, dtype=dtype)


def _cf(t: torch.Tensor, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary part of the empirical CF at every frequency: mean_x cos(tᵀx), mean_x sin(tᵀx)."""
    tx = t @ feat.T  # (n_freq, n_samples)
    return torch.cos(tx).mean(1), torch.sin(tx).mean(1)


def cf_loss(feat_real: torch.Tensor, feat_syn: torch.Tensor, *, t: torch.Tensor, alpha: float = 0.5,
            beta: float = 0.5, normalize: bool = True) -> torch.Tensor:
    """NCFM characteristic-function discrepancy between two feature sets (one class). Lower = closer.

    ``t``: (n_freq, d) frequency arguments (``sample_frequencies``). ``alpha`` weighs the amplitude term, ``beta`` the
    phase term (reference 0.5 / 0.5). ``normalize``: L2-normalise every feature row first (the reference does).
    The reference multiplies the result by 300 before backpropagation; the pipeline exposes that as ``loss_scale``.
    """
    if feat_real.ndim != 2 or feat_syn.ndim != 2 or feat_real.shape[1] != feat_syn.shape[1]:
        raise ValueError(f"features must be (n, d) with the same d, got {tuple(feat_real.shape)} and {tuple(feat_syn.shape)}")
    if t.ndim != 2 or t.shape[1] != feat_real.shape[1]:
        raise ValueError(f"t must be (n_freq, {feat_real.shape[1]}), got {tuple(t.shape)}")
    if alpha < 0 or beta < 0 or alpha + beta == 0:
        raise ValueError(f"alpha and beta must be >= 0 and not both 0, got {alpha}, {beta}")
    if normalize:
        feat_real = F.normalize(feat_real, dim=1)
        feat_syn = F.normalize(feat_syn, dim=1)
    re_r, im_r = _cf(t, feat_real)
    re_s, im_s = _cf(t, feat_syn)
    amp_r = torch.sqrt(re_r ** 2 + im_r ** 2)
    amp_s = torch.sqrt(re_s ** 2 + im_s ** 2 + 1e-12)  # eps: sqrt'(0) is infinite
    loss_amp = (amp_r - amp_s) ** 2
    loss_pha = (2 * (amp_r * amp_s - re_r * re_s - im_r * im_s)).clamp(min=1e-12)
    return torch.sqrt(alpha * loss_amp + beta * loss_pha).mean()


# -------------------------------------------------------------------------------------------------------- FYI
def flip_concat(x: torch.Tensor) -> torch.Tensor:
    """FYI: the batch followed by its horizontal mirror, (2N, C, H, W); gradients flow back to both copies' source."""
    return torch.cat([x, x.flip(-1)], dim=0)
