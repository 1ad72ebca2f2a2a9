"""Adversarial cloaking: a small, budgeted perturbation that moves a face's embedding away.

In the spirit of Fawkes (Shan et al., USENIX Security 2020) and LowKey (Cherepanova et al.,
ICLR 2021): each face gets a perturbation ``delta`` on the pixels around it (the face box with
a margin, and every pixel the aligned chip samples) that minimises the cosine similarity of
the face's embedding to its original embedding and maximises it to a *target* identity's,
under a SURROGATE recognizer (a fedface backbone, loaded from a ``model.pt``), while

* the structural dissimilarity ``DSSIM = (1 - SSIM) / 2`` between the original and the cloaked
  face region stays within ``budget`` (Fawkes' presets, :data:`FAWKES_BUDGETS`: low 0.004,
  mid 0.012, high 0.017),
* no pixel changes by more than ``linf`` (in 0..255) and pixels stay in 0..255,
* pixels outside the face region never change.

Threat model
------------
The adversary is a face recognizer run by whoever obtains the published image (a scraper,
a platform, a data broker): it detects the face, aligns it and compares its embedding to a
gallery of the true person. The cloak only knows the surrogate, i.e. our own model; it is
white-box against that model and a transfer attack against everything else.

Known limits (report them with any result): cloaks often fail against other recognizers,
and against models adapted to them (trained on cloaked images, or robustly trained); a
recognizer that sees the uncloaked image once, or that is updated later, is unaffected
(Radiya-Dixit et al., "Data Poisoning Won't Save You From Facial Recognition", ICLR 2022).
Small surrogates such as ``tinyface`` transfer poorly to large independent models such as
dlib's 128-d ResNet; measure transfer rather than assume it.

Method
------
For each face the 5 dlib landmarks (given in the :class:`~fedface.anonymize.boxes.Box`, or
found with dlib's 5-point shape predictor) define the same similarity transform as
``dlib.get_face_chip`` (the chip geometry :mod:`fedface.data.align` trains on: chip side
``meta["image_size"]``, padding 0.25), applied with ``torch.nn.functional.grid_sample`` so
that gradients reach the image pixels. Bilinear sampling reproduces dlib's chip to within its
integer truncation when the face spans at most about twice the chip; larger faces first go
through a [1 4 6 4 1] Gaussian pyramid, as dlib's does, which approximates dlib's chip
(surrogate embedding cosine >= 0.99 to dlib's on LFW faces upscaled 2-5x). The perturbation
is optimised with Adam on the loss::

    cos(f(x + delta), f(x)) - cos(f(x + delta), t) + penalty * relu(DSSIM - 0.95 budget) / budget

(Fawkes' penalty form, with a hinge), each step followed by a projection onto the ``linf``
box and ``[0, 255]``. The perturbation fades out over the region's outer 6 % so that no seam
shows. Optionally (``jitter``) the chip sampling is shifted at random each step (expectation
over transformation); on LFW it did not make the cloak survive landmark re-detection better.
The result is quantized to uint8 and checked: if the DSSIM of any face region exceeds the
budget the perturbation is scaled down (bisection) until it does not, so the budget is a
guarantee, not a target.

SSIM follows ``tf.image.ssim`` (which Fawkes uses): 11 x 11 Gaussian window, sigma 1.5,
``K1 = 0.01``, ``K2 = 0.03``, dynamic range 255, valid convolution, mean over pixels and RGB
channels; it is computed at the image's own resolution over the face region (Fawkes resizes
the face crop to 224 px first).

Targets: ``"synthetic"`` pulls every face towards one generated identity of
:mod:`fedface.data.synthetic` (cartoon faces, no real person), picked by ``seed``;
``"farthest"`` pulls each face towards the member of a target pool whose embedding is
farthest (lowest cosine) from the face's own (Fawkes' choice). The pool is ``targets``
(embeddings you pass) or, by default, ``target_pool`` synthetic identities (numbered from
:data:`SYNTHETIC_TARGET_OFFSET`, far from any identity a synthetic training run uses).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedface.errors import UserError

from .boxes import Box
from .geometry import chip_transform, five_points

__all__ = [
    "DEFAULT_PADDING",
    "FAWKES_BUDGETS",
    "SYNTHETIC_TARGET_OFFSET",
    "Cloak",
    "CloakConfig",
    "CloakReport",
    "chip_transform",
    "cloak_chips",
    "dssim",
    "synthetic_target_embeddings",
]

#: Fawkes' DSSIM budgets by protection mode.
FAWKES_BUDGETS: dict[str, float] = {"low": 0.004, "mid": 0.012, "high": 0.017}
#: Chip padding of :class:`fedface.data.align.AlignConfig` (used when ``meta`` names none).
DEFAULT_PADDING = 0.25
#: First synthetic identity index of the default target pool.
SYNTHETIC_TARGET_OFFSET = 1_000_000
TARGETS = ("synthetic", "farthest")

_PYR_KERNEL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
_SSIM_SIZE, _SSIM_SIGMA = 11, 1.5
_OPT_MARGIN = 0.95  # the optimiser aims below the budget; the final check enforces it


@dataclass(frozen=True)
class CloakConfig:
    """How strongly and how to cloak.

    Parameters
    ----------
    budget : float, default 0.012
        Maximum DSSIM between the original and cloaked face region (Fawkes' "mid"; "low" is
        0.004, "high" 0.017, see :data:`FAWKES_BUDGETS`). Guaranteed on the uint8 output.
    linf : float, default 12.0
        Maximum change of any pixel channel, in 0..255 units.
    steps : int, default 100
        Optimisation steps per face (or per batch of chips).
    lr : float, default 1.0
        Adam step size in pixel (0..255) units, decayed to 0 on a cosine schedule.
    target : {"farthest", "synthetic"}, default "farthest"
        Target identity (see the module docstring).
    seed : int, default 0
        Seeds the random start, the alignment jitter and the synthetic target choice.
    margin : float, default 0.1
        The perturbed region is the face box grown by this fraction of its size on each
        side, joined with the chip's footprint in the image.
    jitter : float, default 0.0
        Random shift (in chip pixels) of the chip sampling at each step; 0 disables it.
    penalty : float, default 10.0
        Weight of the DSSIM hinge penalty.
    target_pool : int, default 32
        Number of synthetic identities in the default target pool.
    """

    budget: float = FAWKES_BUDGETS["mid"]
    linf: float = 12.0
    steps: int = 100
    lr: float = 1.0
    target: str = "farthest"
    seed: int = 0
    margin: float = 0.1
    jitter: float = 0.0
    penalty: float = 10.0
    target_pool: int = 32

    def __post_init__(self) -> None:
        if not 0.0 < float(self.budget) < 0.5:
            raise ValueError(f"CloakConfig.budget (DSSIM) must be in (0, 0.5), got {self.budget!r}")
        if not 0.0 < float(self.linf) <= 255.0:
            raise ValueError(f"CloakConfig.linf must be in (0, 255], got {self.linf!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"CloakConfig.steps must be an int >= 0, got {self.steps!r}")
        if not float(self.lr) > 0.0:
            raise ValueError(f"CloakConfig.lr must be > 0, got {self.lr!r}")
        if self.target not in TARGETS:
            raise ValueError(f"CloakConfig.target must be one of {TARGETS}, got {self.target!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"CloakConfig.seed must be an int >= 0, got {self.seed!r}")
        if not 0.0 <= float(self.margin) <= 2.0:
            raise ValueError(f"CloakConfig.margin must be in [0, 2], got {self.margin!r}")
        if not 0.0 <= float(self.jitter) <= 8.0:
            raise ValueError(f"CloakConfig.jitter must be in [0, 8] chip pixels, got {self.jitter!r}")
        if not float(self.penalty) >= 0.0:
            raise ValueError(f"CloakConfig.penalty must be >= 0, got {self.penalty!r}")
        if not isinstance(self.target_pool, int) or self.target_pool < 1:
            raise ValueError(f"CloakConfig.target_pool must be an int >= 1, got {self.target_pool!r}")

    @classmethod
    def preset(cls, mode: str, **overrides: Any) -> CloakConfig:
        """A config with Fawkes' budget for ``mode`` (``"low"``, ``"mid"``, ``"high"``)."""
        if mode not in FAWKES_BUDGETS:
            raise ValueError(f"unknown cloak mode {mode!r}; expected one of {', '.join(FAWKES_BUDGETS)}")
        overrides.setdefault("budget", FAWKES_BUDGETS[mode])
        return cls(**overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CloakReport:
    """What the cloak did to one face (or chip).

    Attributes
    ----------
    status : str
        ``"cloaked"``, or ``"skipped"`` (a face box with no pixels in the image).
    dssim : float
        Final DSSIM of the face region (uint8 output against the input), ``<= budget``.
    linf : float
        Largest change of a pixel channel in the region (0..255 units).
    cos_original : float
        Surrogate cosine similarity of the cloaked face to the original face (1 = unchanged).
    cos_target : float
        Surrogate cosine similarity of the cloaked face to the target.
    cos_target_before : float
        The same for the original face.
    target : str
        Which target (``"synthetic:<identity>"`` or ``"pool:<index>"``).
    scale : float
        Factor applied to the optimised perturbation by the final budget check (1 = none).
    region : tuple of int
        ``(x0, y0, x1, y1)`` of the perturbed pixels (the whole chip for chips).
    seconds : float
        Wall time spent on this face (for a batch of chips: the batch time divided evenly).
    landmarks : str
        ``"given"``, ``"dlib"`` (found by the 5-point predictor) or ``"chip"``.
    """

    status: str
    dssim: float = 0.0
    linf: float = 0.0
    cos_original: float = 1.0
    cos_target: float = float("nan")
    cos_target_before: float = float("nan")
    target: str = ""
    scale: float = 1.0
    region: tuple[int, int, int, int] = (0, 0, 0, 0)
    seconds: float = 0.0
    landmarks: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["region"] = list(self.region)
        for k in ("dssim", "linf", "cos_original", "cos_target", "cos_target_before", "scale",
                  "seconds"):
            d[k] = round(float(d[k]), 6)
        return d


# --------------------------------------------------------------------------- SSIM


def _gauss_window(device=None, dtype=torch.float32) -> torch.Tensor:
    x = torch.arange(_SSIM_SIZE, dtype=torch.float64) - (_SSIM_SIZE - 1) / 2
    g = torch.exp(-(x * x) / (2 * _SSIM_SIGMA**2))
    return (g / g.sum()).to(device=device, dtype=dtype)


def _ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample SSIM of ``(B, C, H, W)`` images in 0..255 (``tf.image.ssim`` conventions).

    Regions smaller than the 11 px window use a window of their own size (truncated
    Gaussian), so any region of at least 1 x 1 pixels works.
    """
    _, c, h, w = a.shape
    g = _gauss_window(a.device, a.dtype)
    kh, kw = min(_SSIM_SIZE, h), min(_SSIM_SIZE, w)
    gh = g[(_SSIM_SIZE - kh) // 2:(_SSIM_SIZE - kh) // 2 + kh]
    gw = g[(_SSIM_SIZE - kw) // 2:(_SSIM_SIZE - kw) // 2 + kw]
    gh, gw = gh / gh.sum(), gw / gw.sum()
    maps = torch.cat([a, b, a * a, b * b, a * b], 1)  # one grouped blur for all five
    k = 5 * c
    blurred = F.conv2d(F.conv2d(maps, gh.view(1, 1, kh, 1).expand(k, 1, kh, 1), groups=k),
                       gw.view(1, 1, 1, kw).expand(k, 1, 1, kw), groups=k)
    mu_a, mu_b, ea2, eb2, eab = blurred.split(c, 1)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    saa, sbb, sab = ea2 - mu_a * mu_a, eb2 - mu_b * mu_b, eab - mu_a * mu_b
    lum = (2 * mu_a * mu_b + c1) / (mu_a * mu_a + mu_b * mu_b + c1)
    cs = (2 * sab + c2) / (saa + sbb + c2)
    return (lum * cs).flatten(1).mean(1)


def _dssim_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1.0 - _ssim(a, b)) / 2.0


def dssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural dissimilarity ``(1 - SSIM) / 2`` of two ``HxWx3`` (or ``HxW``) images.

    Parameters
    ----------
    a, b : ndarray
        Same shape, values in 0..255 (uint8 or float).

    Returns
    -------
    float
        0 for identical images; Fawkes' budgets are 0.004 / 0.012 / 0.017.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"dssim needs images of the same shape, got {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim != 3 or a.size == 0:
        raise ValueError(f"dssim expects HxWx3 or HxW images, got shape {a.shape}")
    ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).permute(2, 0, 1)[None]
    tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64)).permute(2, 0, 1)[None]
    return float(_dssim_t(ta, tb)[0])


# --------------------------------------------------------------------------- geometry


def _pyramid_down(x: torch.Tensor) -> torch.Tensor:
    """Blur with [1 4 6 4 1]/16 (separable, reflect border) and keep every other pixel."""
    c = x.shape[1]
    k = _PYR_KERNEL.to(x.dtype)
    pad = "reflect" if min(x.shape[-2:]) > 2 else "replicate"
    x = F.pad(x, (2, 2, 2, 2), mode=pad)
    x = F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return x[:, :, ::2, ::2]


def _pyramid_depth(affine: np.ndarray, size: int) -> int:
    """How many halvings dlib's ``extract_image_chip`` applies before sampling."""
    side = math.hypot(affine[0, 0], affine[1, 0]) * (size - 1) + 1.0
    side /= 2.0
    depth = 0
    while side * side > size * size and depth < 8:
        side /= 2.0
        depth += 1
    return depth


class _Sampler:
    """Differentiable chip extraction: image tensor -> normalized backbone input."""

    def __init__(self, affines: np.ndarray, size: int, in_hw: tuple[int, int], depth: int):
        self.size, self.depth = size, depth
        h, w = in_hw
        for _ in range(depth):
            h, w = (h + 1) // 2, (w + 1) // 2
        self.hw = (h, w)
        a = torch.as_tensor(np.asarray(affines), dtype=torch.float32).clone()  # (B, 2, 3)
        a /= 2.0**depth  # pyramid level coordinates: x' = x / 2^d
        self.affines = a
        r = torch.arange(size, dtype=torch.float32)
        gy, gx = torch.meshgrid(r, r, indexing="ij")
        self.base = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(-1, 3)  # (S*S, 3)

    def __call__(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        for _ in range(self.depth):
            x = _pyramid_down(x)
        base = self.base if shift is None else self.base.clone()
        b = x.shape[0]
        grid_pts = base.unsqueeze(0).expand(b, -1, -1)
        if shift is not None:  # (B, 2) chip-pixel offsets
            grid_pts = grid_pts + torch.cat([shift, torch.zeros(b, 1)], 1).unsqueeze(1)
        pts = torch.einsum("bij,bnj->bni", self.affines, grid_pts)  # image pixel coords
        h, w = self.hw
        nx = pts[..., 0] * (2.0 / max(w - 1, 1)) - 1.0
        ny = pts[..., 1] * (2.0 / max(h - 1, 1)) - 1.0
        grid = torch.stack([nx, ny], -1).view(b, self.size, self.size, 2).to(x.dtype)
        chip = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return (chip - 127.5) / 127.5


# --------------------------------------------------------------------------- targets


def _unit(e: torch.Tensor) -> torch.Tensor:
    return F.normalize(e, dim=-1, eps=1e-12)


def _embed_inputs(model: nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([_unit(model(x[i:i + batch])) for i in range(0, len(x), batch)])


def synthetic_target_embeddings(backbone: nn.Module, image_size: int, count: int = 32,
                                images_per_identity: int = 4) -> tuple[np.ndarray, list[int]]:
    """Unit embeddings of generated (cartoon, no real person) target identities.

    Parameters
    ----------
    backbone : torch.nn.Module
        The surrogate.
    image_size : int
        Its input side; the identities are rendered at this size.
    count : int, default 32
        Identities ``SYNTHETIC_TARGET_OFFSET .. + count - 1`` of the default
        :class:`~fedface.data.synthetic.SyntheticConfig` (seed 0).
    images_per_identity : int, default 4
        Renders averaged per identity (pose, lighting and expression vary).

    Returns
    -------
    (ndarray of shape (count, D), list of int)
        One unit-norm embedding per identity, and the identity indices.
    """
    from fedface.data import synthetic as syn

    cfg = syn.SyntheticConfig(size=int(image_size), images_per_identity=images_per_identity)
    ids = list(range(SYNTHETIC_TARGET_OFFSET, SYNTHETIC_TARGET_OFFSET + int(count)))
    images, _ = syn.generate(cfg, ids)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    with _eval_mode(backbone):
        e = _embed_inputs(backbone, x)
    e = _unit(e.view(len(ids), images_per_identity, -1).mean(1))
    return e.numpy(), ids


class _eval_mode:
    """Put a module in eval mode for a block; restore every submodule's flag afterwards."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc) -> None:
        for m, flag in self.modes:
            m.training = flag


class _Targets:
    """The target pool and the rule that picks a target for an original embedding."""

    def __init__(self, backbone: nn.Module, image_size: int, config: CloakConfig,
                 targets: np.ndarray | None):
        self.config = config
        if targets is not None:
            if config.target != "farthest":
                raise ValueError("a target pool (targets=...) is for target='farthest'; "
                                 "target='synthetic' uses a generated identity")
            t = np.asarray(targets, dtype=np.float32)
            if t.ndim != 2 or t.shape[0] < 1:
                raise ValueError(f"targets must be (N, D) embeddings with N >= 1, got {t.shape}")
            self.pool = _unit(torch.from_numpy(t))
            self.names = [f"pool:{i}" for i in range(len(t))]
        else:
            pool, ids = synthetic_target_embeddings(backbone, image_size, config.target_pool)
            self.pool = torch.from_numpy(pool)
            self.names = [f"synthetic:{i}" for i in ids]
        rng = np.random.default_rng([config.seed, 0xC10A])
        self.fixed = int(rng.integers(len(self.names)))

    def pick(self, e0: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """Targets ``(B, D)`` and their names for original unit embeddings ``(B, D)``."""
        if self.pool.shape[1] != e0.shape[1]:
            raise ValueError(f"target embeddings have dimension {self.pool.shape[1]}, the "
                             f"surrogate's embeddings {e0.shape[1]}")
        if self.config.target == "synthetic":
            idx = [self.fixed] * len(e0)
        else:
            idx = (e0 @ self.pool.T).argmin(1).tolist()
        return self.pool[idx], [self.names[i] for i in idx]


# --------------------------------------------------------------------------- optimisation


def _draws(gens: Sequence[torch.Generator], shape: tuple[int, ...], config: CloakConfig
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random start ``(B, *shape)`` (uniform, +-1 pixel) and per-step jitter ``(steps, B, 2)``,
    each sample from its own generator (so a chip's result does not depend on its batch)."""
    init = torch.stack([torch.rand(shape, generator=g) * 2 - 1 for g in gens])
    init = init * min(1.0, float(config.linf))
    if config.jitter <= 0 or config.steps == 0:
        return init, None
    shifts = torch.stack([torch.rand(config.steps, 2, generator=g) * 2 - 1 for g in gens], 1)
    return init, shifts * float(config.jitter)


def _optimize(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, sampler: _Sampler,
              region: tuple[int, int, int, int], e0: torch.Tensor, et: torch.Tensor,
              config: CloakConfig, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Optimise the perturbation of ``x`` ``(B, 3, H, W)`` (0..255) where ``mask`` is 1.

    Minimises ``cos(e, e0) - cos(e, et) + penalty * relu(DSSIM - 0.95 budget) / budget`` per
    sample (DSSIM over ``region``) with Adam (cosine-decayed step size), projecting onto the
    ``linf`` box and [0, 255] after each step. Returns the (unquantized) perturbation.
    """
    x0, y0, x1, y1 = region
    linf, budget = float(config.linf), float(config.budget)
    init, shifts = _draws(gens, tuple(x.shape[1:]), config)
    delta = ((torch.clamp(x + init * mask, 0, 255) - x) * mask).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=float(config.lr))
    ref = x[:, :, y0:y1, x0:x1]
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = float(config.lr) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        adv = x + delta * mask
        e = _unit(model(sampler(adv, None if shifts is None else shifts[step])))
        feat = (e * e0).sum(1) - (e * et).sum(1)
        d = _dssim_t(adv[:, :, y0:y1, x0:x1], ref)
        pen = F.relu(d - _OPT_MARGIN * budget) / budget
        loss = (feat + float(config.penalty) * pen).sum()
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        opt.step()
        with torch.no_grad():
            delta.clamp_(-linf, linf)
            delta.copy_((torch.clamp(x + delta, 0, 255) - x) * mask)
    return delta.detach() * mask


def _quantize(x: torch.Tensor, delta: torch.Tensor, linf: float, scale: float) -> torch.Tensor:
    """``x + scale * delta`` rounded to integers, each change within ``floor(linf)``."""
    cap = math.floor(linf + 1e-9)
    step = torch.clamp(torch.round(delta * scale), -cap, cap)
    return torch.clamp(x + step, 0, 255)


def _fit_budget(x: torch.Tensor, delta: torch.Tensor, regions: Sequence[tuple[int, int, int, int]],
                budget: float, linf: float) -> tuple[torch.Tensor, float]:
    """Quantized ``x + scale * delta`` with the largest ``scale`` in [0, 1] (bisection) such that
    every region's DSSIM is within ``budget``; returns ``(image, scale)``. ``x`` is (1, 3, H, W)
    for a whole image (several regions) or (B, 3, h, w) chips with one region each."""

    def worst(scale: float) -> tuple[torch.Tensor, float]:
        q = _quantize(x, delta, linf, scale)
        if x.shape[0] == 1:
            ds = [float(_dssim_t(q[:, :, y0:y1, x0:x1], x[:, :, y0:y1, x0:x1])[0])
                  for x0, y0, x1, y1 in regions]
        else:
            x0, y0, x1, y1 = regions[0]
            ds = _dssim_t(q[:, :, y0:y1, x0:x1], x[:, :, y0:y1, x0:x1]).tolist()
        return q, max(ds, default=0.0)

    q, d = worst(1.0)
    if d <= budget:
        return q, 1.0
    lo, hi = 0.0, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        if worst(mid)[1] <= budget:
            lo = mid
        else:
            hi = mid
    return worst(lo)[0], lo


def _fit_budget_per_sample(x: torch.Tensor, delta: torch.Tensor, budget: float,
                           linf: float) -> tuple[torch.Tensor, list[float]]:
    """Per-chip version of :func:`_fit_budget` (each chip scaled on its own)."""
    out, scales = [], []
    region = (0, 0, x.shape[3], x.shape[2])
    for i in range(x.shape[0]):
        q, s = _fit_budget(x[i:i + 1], delta[i:i + 1], [region], budget, linf)
        out.append(q)
        scales.append(s)
    return torch.cat(out), scales


def _feather_mask(h: int, w: int, region: tuple[int, int, int, int], feather: int) -> torch.Tensor:
    """``(1, 1, h, w)`` mask: 1 inside ``region`` ramping linearly to 0 over its outer
    ``feather`` pixels (so no seam shows at the region's edge), 0 outside."""
    x0, y0, x1, y1 = region

    def ramp(n: int, lo: int, hi: int) -> torch.Tensor:
        i = torch.arange(n, dtype=torch.float32)
        inside = ((i >= lo) & (i < hi)).float()
        edge = torch.minimum(i - lo + 1, hi - i) / (feather + 1)
        return inside * edge.clamp(0, 1)

    return (ramp(h, y0, y1)[:, None] * ramp(w, x0, x1)[None, :])[None, None]


def _as_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"the image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"the image must be uint8 RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"the image must be HxWx3 RGB, got shape {image.shape}")
    return image


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 -> ``(N, 3, H, W)`` float32 in 0..255."""
    return torch.from_numpy(np.array(images, dtype=np.float32)).permute(0, 3, 1, 2)


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


def _generator(seed: int, k: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(k))


# --------------------------------------------------------------------------- public API


class Cloak:
    """Cloak the faces of whole images against a surrogate backbone.

    Parameters
    ----------
    backbone : torch.nn.Module
        The surrogate recognizer (``(N, 3, S, S)`` inputs scaled to [-1, 1] -> embeddings).
    meta : dict
        Its metadata from :func:`fedface.models.io.load_backbone`: ``image_size`` (chip side
        ``S``), optionally ``align_padding`` (default 0.25, as :class:`AlignConfig`).
    config : CloakConfig, optional
        Defaults to ``CloakConfig()``.
    targets : ndarray, shape (N, D), optional
        Target pool embeddings (default: synthetic identities, see the module docstring).

    Attributes
    ----------
    last_report : list of CloakReport
        One report per face of the latest :meth:`apply` call.
    """

    def __init__(self, backbone: nn.Module, meta: dict, config: CloakConfig | None = None,
                 targets: np.ndarray | None = None):
        self.backbone = backbone
        self.meta = dict(meta or {})
        if "image_size" not in self.meta:
            raise ValueError("meta must name the backbone's input side as meta['image_size']")
        self.image_size = int(self.meta["image_size"])
        extra = self.meta.get("extra") or {}
        self.padding = float(self.meta.get("align_padding", extra.get("align_padding",
                                                                       DEFAULT_PADDING)))
        self.config = config if config is not None else CloakConfig()
        self._target_arg = targets
        self._targets: _Targets | None = None
        self._predictor: Any = None
        self.last_report: list[CloakReport] = []

    @classmethod
    def load(cls, model_path: str | Path, config: CloakConfig | None = None,
             targets: np.ndarray | None = None) -> Cloak:
        """A cloak whose surrogate is the backbone saved at ``model_path`` (a fedface ``model.pt``).

        Raises
        ------
        UserError
            If the file does not exist or is not a fedface model file.
        """
        from fedface.models.io import load_backbone

        path = Path(model_path)
        if not path.is_file():
            raise UserError(
                f"cloak surrogate model {path} does not exist: pass the model.pt a fedface run "
                "wrote (`fedface train --out DIR` writes DIR/model.pt)")
        try:
            model, meta = load_backbone(path)
        except (FileNotFoundError, ValueError, RuntimeError, KeyError) as err:
            raise UserError(f"cannot use {path} as the cloak's surrogate: {err}") from err
        return cls(model, meta, config, targets)

    # -- helpers --------------------------------------------------------------------------------
    @property
    def targets(self) -> _Targets:
        if self._targets is None:
            self._targets = _Targets(self.backbone, self.image_size, self.config, self._target_arg)
        return self._targets

    def _landmarks(self, image: np.ndarray, box: Box) -> tuple[np.ndarray, str]:
        lm = five_points(box.landmarks)
        if lm is not None:
            return lm, "given"
        import dlib

        from fedface.data.dlib_models import load_shape_predictor

        if self._predictor is None:
            self._predictor = load_shape_predictor(5)
        rect = dlib.rectangle(int(round(box.x0)), int(round(box.y0)),
                              int(round(box.x1)) - 1, int(round(box.y1)) - 1)
        shape = self._predictor(image, rect)
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64), "dlib"

    def _region(self, box: Box, affine: np.ndarray, w: int, h: int) -> tuple[int, int, int, int]:
        s = self.image_size - 1
        corners = affine[:, :2] @ np.array([[0, s, 0, s], [0, 0, s, s]], float) + affine[:, 2:]
        grown = box.expand(1.0 + 2.0 * float(self.config.margin))
        x0 = min(grown.x0, corners[0].min() - 1)
        y0 = min(grown.y0, corners[1].min() - 1)
        x1 = max(grown.x1, corners[0].max() + 2)
        y1 = max(grown.y1, corners[1].max() + 2)
        return Box(x0, y0, x1, y1).pixels(w, h)

    # -- main -----------------------------------------------------------------------------------
    def apply(self, image: np.ndarray, faces: Sequence[Box]) -> np.ndarray:
        """Cloak every face of ``image``.

        Parameters
        ----------
        image : ndarray, HxWx3 uint8 RGB
            Left untouched.
        faces : list of Box
            Faces in image coordinates; those without 5 (or 68) landmarks get dlib's 5-point
            landmarks inside their box.

        Returns
        -------
        ndarray, HxWx3 uint8
            A copy with each face region perturbed (DSSIM of each region <= ``budget``,
            every change <= ``linf``); :attr:`last_report` describes each face.
        """
        image = _as_image(image)
        h, w = image.shape[:2]
        cfg = self.config
        x = _to_tensor(image[None])
        work = x.clone()
        plans: list[dict] = []
        with _eval_mode(self.backbone) as model:
            for k, box in enumerate(faces):
                t_start = time.perf_counter()
                if not isinstance(box, Box):
                    raise TypeError(f"faces must be Box objects, got {type(box).__name__}")
                if box.clip(w, h).area <= 0:
                    plans.append({"skip": True})
                    continue
                lm, source = self._landmarks(image, box)
                affine = chip_transform(lm, self.image_size, self.padding)
                rx0, ry0, rx1, ry1 = self._region(box, affine, w, h)
                if rx1 - rx0 < 2 or ry1 - ry0 < 2:
                    plans.append({"skip": True})
                    continue
                depth = _pyramid_depth(affine, self.image_size)
                ctx = 2 ** (depth + 2) if depth else 1  # context for the pyramid's blur
                cx0, cy0 = max(rx0 - ctx, 0), max(ry0 - ctx, 0)
                cx1, cy1 = min(rx1 + ctx, w), min(ry1 + ctx, h)
                local = affine.copy()
                local[:, 2] -= (cx0, cy0)
                sampler = _Sampler(local[None], self.image_size, (cy1 - cy0, cx1 - cx0), depth)
                crop = work[:, :, cy0:cy1, cx0:cx1]
                region = (rx0 - cx0, ry0 - cy0, rx1 - cx0, ry1 - cy0)
                feather = max(1, round(0.06 * min(rx1 - rx0, ry1 - ry0)))
                mask = _feather_mask(cy1 - cy0, cx1 - cx0, region, feather)
                orig_crop = x[:, :, cy0:cy1, cx0:cx1]
                e0 = _embed_inputs(model, sampler(orig_crop))
                et, names = self.targets.pick(e0)
                delta = _optimize(model, crop, mask, sampler, region, e0, et, cfg,
                                  [_generator(cfg.seed, k)])
                # a face may lie on another's region: keep every change within linf of the input
                new = torch.clamp(crop + delta, 0, 255)
                new = torch.minimum(torch.maximum(new, orig_crop - cfg.linf), orig_crop + cfg.linf)
                work[:, :, cy0:cy1, cx0:cx1] = torch.where(mask > 0, new, crop)
                plans.append({"skip": False, "region": (rx0, ry0, rx1, ry1), "sampler": sampler,
                              "ctx": (cx0, cy0, cx1, cy1), "e0": e0, "et": et,
                              "target": names[0], "landmarks": source,
                              "seconds": time.perf_counter() - t_start})
            regions = [p["region"] for p in plans if not p["skip"]]
            out, scale = x.clone(), 1.0
            if regions:  # the final check runs on the smallest box holding every region
                ux0, uy0 = min(r[0] for r in regions), min(r[1] for r in regions)
                ux1, uy1 = max(r[2] for r in regions), max(r[3] for r in regions)
                sub = x[:, :, uy0:uy1, ux0:ux1]
                local = [(a - ux0, b - uy0, c - ux0, d - uy0) for a, b, c, d in regions]
                fitted, scale = _fit_budget(sub, work[:, :, uy0:uy1, ux0:ux1] - sub, local,
                                            cfg.budget, cfg.linf)
                out[:, :, uy0:uy1, ux0:ux1] = fitted
            reports = []
            for p in plans:
                if p["skip"]:
                    reports.append(CloakReport(status="skipped"))
                    continue
                rx0, ry0, rx1, ry1 = p["region"]
                cx0, cy0, cx1, cy1 = p["ctx"]
                e1 = _embed_inputs(model, p["sampler"](out[:, :, cy0:cy1, cx0:cx1]))
                diff = (out - x)[:, :, ry0:ry1, rx0:rx1]
                reports.append(CloakReport(
                    status="cloaked",
                    dssim=float(_dssim_t(out[:, :, ry0:ry1, rx0:rx1], x[:, :, ry0:ry1, rx0:rx1])[0]),
                    linf=float(diff.abs().max()) if diff.numel() else 0.0,
                    cos_original=float((e1 * p["e0"]).sum()),
                    cos_target=float((e1 * p["et"]).sum()),
                    cos_target_before=float((p["e0"] * p["et"]).sum()),
                    target=p["target"], scale=scale, region=p["region"],
                    seconds=p["seconds"], landmarks=p["landmarks"]))
        self.last_report = reports
        return _to_uint8(out)[0]


def cloak_chips(backbone: nn.Module, chips: np.ndarray, config: CloakConfig | None = None, *,
                image_size: int | None = None, labels: np.ndarray | None = None,
                targets: np.ndarray | None = None, batch_size: int = 64,
                report: list | None = None) -> np.ndarray:
    """Cloak already aligned face chips (e.g. a client's training set before federated training).

    Parameters
    ----------
    backbone : torch.nn.Module
        The surrogate.
    chips : ndarray, (N, H, W, 3) uint8 RGB
        Aligned chips (left untouched); the whole chip may change.
    config : CloakConfig, optional
        Defaults to ``CloakConfig()`` (``margin`` is unused here).
    image_size : int, optional
        The backbone's input side (default: ``backbone.input_size`` if it has one, else ``H``);
        chips of another size are resampled to it (differentiably) for the surrogate only.
    labels : ndarray, (N,), optional
        Identity of each chip: with ``target="farthest"``, all chips of one identity get the
        target farthest from that identity's mean embedding (as Fawkes does per user).
    targets : ndarray, (M, D), optional
        Target pool (default: synthetic identities).
    batch_size : int, default 64
        Chips optimised together (results do not depend on it).
    report : list, optional
        If given, one :class:`CloakReport` per chip is appended to it.

    Returns
    -------
    ndarray, (N, H, W, 3) uint8
        Cloaked chips: DSSIM of each <= ``budget``, every change <= ``linf``.
    """
    cfg = config if config is not None else CloakConfig()
    chips = np.asarray(chips)
    if chips.dtype != np.uint8 or chips.ndim != 4 or chips.shape[3] != 3:
        raise ValueError(f"chips must be (N, H, W, 3) uint8 RGB, got {chips.dtype} {chips.shape}")
    n, h, w = chips.shape[:3]
    if n == 0:
        return chips.copy()
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    size = int(image_size or getattr(backbone, "input_size", 0) or h)
    affine = np.array([[(w - 1) / (size - 1), 0, 0], [0, (h - 1) / (size - 1), 0]], float)
    depth = _pyramid_depth(affine, size) if (h, w) != (size, size) else 0
    pool = _Targets(backbone, size, cfg, targets)
    out = np.empty_like(chips)
    with _eval_mode(backbone) as model:
        x_all = _to_tensor(chips)
        sampler_all = _Sampler(np.repeat(affine[None], n, 0), size, (h, w), depth)
        e0_all = _embed_inputs(model, sampler_all(x_all))
        if labels is not None and cfg.target == "farthest":
            et_all = torch.empty_like(e0_all)
            names_all = [""] * n
            for lab in np.unique(labels):
                idx = np.flatnonzero(labels == lab)
                centre = _unit(e0_all[idx].mean(0, keepdim=True))
                et, names = pool.pick(centre)
                et_all[idx] = et
                for i in idx:
                    names_all[i] = names[0]
        else:
            et_all, names_all = pool.pick(e0_all)
        for start in range(0, n, batch_size):
            t_start = time.perf_counter()
            sl = slice(start, min(start + batch_size, n))
            x = x_all[sl]
            b = x.shape[0]
            sampler = _Sampler(np.repeat(affine[None], b, 0), size, (h, w), depth)
            mask = torch.ones(b, 1, h, w)
            # one generator per chip keeps results independent of the batching
            gens = [_generator(cfg.seed, i) for i in range(sl.start, sl.stop)]
            delta = _optimize(model, x, mask, sampler, (0, 0, w, h), e0_all[sl], et_all[sl],
                              cfg, gens)
            q, scales = _fit_budget_per_sample(x, delta, cfg.budget, cfg.linf)
            out[sl] = _to_uint8(q)
            if report is not None:
                e1 = _embed_inputs(model, sampler(q))
                d = _dssim_t(q, x)
                per = (time.perf_counter() - t_start) / b
                for j in range(b):
                    i = start + j
                    report.append(CloakReport(
                        status="cloaked", dssim=float(d[j]),
                        linf=float((q[j] - x[j]).abs().max()),
                        cos_original=float((e1[j] * e0_all[i]).sum()),
                        cos_target=float((e1[j] * et_all[i]).sum()),
                        cos_target_before=float((e0_all[i] * et_all[i]).sum()),
                        target=names_all[i], scale=scales[j], region=(0, 0, w, h),
                        seconds=per, landmarks="chip"))
    return out
