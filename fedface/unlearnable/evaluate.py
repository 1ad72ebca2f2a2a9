"""How well a recognizer learns from (protected) images: what an adversary would train.

:func:`train_identifier` trains a backbone with a softmax head on chips (the one training
loop, :func:`fedface.training.train_epochs`) and :func:`top1` scores it on clean held-out
chips of the same people. The adversary's counter-measures, each a row of
``fedface bench unlearnable``: :func:`grayscale`, :func:`jpeg`, :func:`strong_augment`
(random resized crop, flip, colour jitter), :func:`pgd` (adversarial training) and a mix of
clean and protected images; :func:`image_quality` measures what the
noise costs the picture (SSIM, PSNR).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedface.eval.embed import to_tensor
from fedface.models import build_backbone, build_head
from fedface.training import cosine_lr, make_optimizer, train_epochs

__all__ = ["TrainSettings", "grayscale", "image_quality", "jpeg", "pgd", "strong_augment",
           "top1", "train_identifier"]


@dataclass(frozen=True)
class TrainSettings:
    """The adversary's training recipe (cosine learning rate from ``lr``)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    seed: int = 0


def train_identifier(arch: str, chips: np.ndarray, labels: np.ndarray, num_classes: int,
                     settings: TrainSettings = TrainSettings(), augmentation=None,
                     adversarial: bool = False) -> tuple[nn.Module, nn.Module]:
    """A ``arch`` backbone and softmax head trained on ``chips`` (uint8) and ``labels``;
    ``augmentation(x, generator)`` replaces the standard flip and shift; ``adversarial``
    trains on each batch's :func:`pgd` worst case (8/255, 3 steps)."""
    torch.manual_seed(settings.seed)
    size = chips.shape[1]
    backbone = build_backbone(arch, embedding_size=128, input_size=size)
    head = build_head("softmax", embedding_size=128, num_classes=num_classes)
    opt = make_optimizer(backbone, head, settings.lr, 0.9, 5e-4)
    total = settings.epochs * max(len(chips) // settings.batch_size, 1)
    step = [0]

    def schedule(_loss: float) -> None:
        step[0] += 1
        for group in opt.param_groups:
            group["lr"] = cosine_lr(settings.lr, step[0], total)

    gen = torch.Generator().manual_seed(settings.seed + 1)
    forward = ((lambda x, y: head(backbone(pgd(backbone, head, x, y, gen))))
               if adversarial else None)
    train_epochs(backbone, head, chips, labels, epochs=settings.epochs,
                 batch_size=settings.batch_size, optimizer=opt, seed=settings.seed,
                 on_step=schedule, augmentation=augmentation, forward=forward)
    return backbone, head


@torch.no_grad()
def top1(backbone: nn.Module, head: nn.Module, chips: np.ndarray, labels: np.ndarray) -> float:
    """Share of ``chips`` whose most likely identity is their own."""
    backbone.eval()
    head.eval()
    x = to_tensor(chips)
    hits = 0
    for start in range(0, len(x), 256):
        pred = head(backbone(x[start:start + 256])).argmax(1).numpy()
        hits += int((pred == np.asarray(labels)[start:start + 256]).sum())
    return hits / len(x)


# --------------------------------------------------------------------------- counter-measures


def grayscale(chips: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, replicated to three channels."""
    grey = np.rint(chips.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def jpeg(chips: np.ndarray, quality: int) -> np.ndarray:
    """Each chip through a JPEG of ``quality`` (Pillow), decoded again."""
    from PIL import Image

    out = np.empty_like(chips)
    for i, chip in enumerate(chips):
        buf = io.BytesIO()
        Image.fromarray(chip).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return out


def strong_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Standard augmentation: random resized crop (80-100 % of the side), flip, colour jitter
    (brightness, contrast, saturation +-40 %)."""
    n, _, h, w = x.shape
    side = int(h * (0.8 + 0.2 * float(torch.rand(1, generator=gen))))
    top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
    left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
    x = F.interpolate(x[:, :, top:top + side, left:left + side], size=(h, w), mode="bilinear",
                      align_corners=False)
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    b, c, s = (1 + 0.8 * (torch.rand(3, n, 1, 1, 1, generator=gen) - 0.5))
    img = (x + 1) / 2
    img = img * b
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    img = (img - mean) * c + mean
    grey = (img * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    img = (img - grey) * s + grey
    return img.clamp(0, 1) * 2 - 1


def pgd(backbone: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor,
        gen: torch.Generator, eps: float = 8 / 255, steps: int = 3,
        step_size: float = 2.5 / 255) -> torch.Tensor:
    """The batch's worst case within ``eps`` (fraction of the pixel range) against the current
    model, by ``steps`` of projected gradient ascent from a random start (Madry et al.):
    adversarial training trains on these."""
    e, a = 2 * eps, 2 * step_size  # model units: the pixel range is 2 wide
    modes = backbone.training, head.training
    backbone.eval()
    head.eval()
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * e
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(head(backbone((x + delta).clamp(-1, 1))), y)
        grad, = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + a * grad.sign()).clamp(-e, e)
    backbone.train(modes[0])
    head.train(modes[1])
    return (x + delta).clamp(-1, 1).detach()


# --------------------------------------------------------------------------- picture quality


def image_quality(clean: list[np.ndarray], protected: list[np.ndarray]) -> dict:
    """Mean and worst SSIM and PSNR (dB) of protected to clean images, with the anonymizers'
    measures (:func:`fedface.anonymize.evaluate.ssim`, ``psnr``); an unchanged image (PSNR
    infinite) is counted apart."""
    from fedface.anonymize.evaluate import psnr, ssim

    s = [ssim(a, b) for a, b in zip(clean, protected, strict=True)]
    p = np.array([psnr(a, b) for a, b in zip(clean, protected, strict=True)])
    finite = p[np.isfinite(p)]
    return {"ssim": round(float(np.mean(s)), 4), "ssim_min": round(float(np.min(s)), 4),
            "psnr_db": round(float(finite.mean()), 2) if finite.size else None,
            "psnr_min_db": round(float(finite.min()), 2) if finite.size else None,
            "unchanged_images": int((~np.isfinite(p)).sum())}
