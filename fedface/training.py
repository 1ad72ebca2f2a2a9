"""Local training and evaluation steps, shared by clients and centralized training.

One loop (:func:`train_epochs`) trains a backbone with a margin head on aligned chips;
federated clients call it for their local epochs, the centralized baseline for all of
its epochs, so the two differ only in where the data is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedface.eval import embed, pair_scores, raw_pixel_embed, verification_report
from fedface.eval.embed import to_tensor


@dataclass
class TrainResult:
    """Outcome of :func:`train_epochs`."""

    loss: float
    num_examples: int
    steps: int
    seconds: float


def cosine_lr(base_lr: float, step: int, total: int) -> float:
    """Cosine decay from ``base_lr`` (step 0) towards 0 (step ``total``)."""
    if total <= 1:
        return base_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total))


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a small random shift (4% of the side)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = max(1, h // 25)
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return xp[:, :, dy : dy + h, dx : dx + w]


def make_optimizer(backbone: nn.Module, head: nn.Module, lr: float, momentum: float,
                   weight_decay: float, backbone_momentum: float | None = None
                   ) -> torch.optim.SGD:
    """SGD over backbone and head (two groups); ``backbone_momentum`` (PFM's beta) sets
    the backbone's own coefficient, whose buffer :func:`fedface.momentum.seed_momentum`
    starts at the global momentum, while the head keeps ``momentum``."""
    bm = momentum if backbone_momentum is None else backbone_momentum
    groups = [{"params": list(backbone.parameters()), "momentum": bm},
              {"params": list(head.parameters()), "momentum": momentum}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_epochs(
    backbone: nn.Module,
    head: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    on_step=None,
    proximal_mu: float = 0.0,
    batches=None,
    forward=None,
    on_empty=None,
    augmentation=None,
) -> TrainResult:
    """Train ``backbone`` and ``head`` on aligned chips with cross-entropy on margin logits.

    Parameters
    ----------
    backbone, head : nn.Module
        Modified in place.
    images : np.ndarray or torch.Tensor
        uint8 chips (N, H, W, 3), or model inputs already made (float (N, 3, H, W) in
        [-1, 1], e.g. chips plus an unlearnable noise).
    labels : np.ndarray
        Labels 0..C-1 matching the head's classes.
    epochs, batch_size : int
        Passes over the data; the last incomplete batch is dropped when at least one full
        batch exists (margin heads dislike tiny batches).
    lr, momentum, weight_decay : float
        SGD settings, used when ``optimizer`` is None.
    seed : int
        Seeds shuffling and augmentation.
    optimizer : torch.optim.Optimizer, optional
        A caller-owned optimizer (PFM: its backbone buffers start at the global
        momentum; DP-SGD: the private wrapper).
    on_step : callable, optional
        Called with the step's loss after every step.
    proximal_mu : float
        FedProx: adds ``mu / 2 * ||w - w_start||^2`` over the backbone to the loss. With
        a private ``forward`` (DP-SGD) the loss term would be lost: per-sample gradients
        come from the layers' activations, not from a term outside them. There the
        proximal gradient ``mu (w - w_start)``, which depends on the weights alone, is
        applied as a decoupled step after every private step (like decoupled weight
        decay): post-processing, so it costs no privacy.
    batches : callable, optional
        ``batches(generator)`` yields one epoch of index tensors; default: a shuffled
        pass in full batches. DP-SGD passes Poisson sampling here
        (:class:`fedface.privacy.PrivateTraining`).
    forward : callable, optional
        ``forward(x, labels)`` returns logits; default ``head(backbone(x), labels)``.
    on_empty : callable, optional
        Called for an empty batch (DP-SGD's Poisson sampling can draw nobody): the noise-
        only step of :meth:`fedface.privacy.PrivateTraining.empty_step`.
    augmentation : callable, optional
        ``augmentation(x, generator)`` transforms each batch of inputs; default
        :func:`augment` (flip and shift). ``lambda x, g: x`` trains on the inputs as they
        are; an adversarial-training step fits here too.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("No training images: this client holds no data to train on")
    t0 = time.time()
    gen = torch.Generator().manual_seed(int(seed))
    if optimizer is None:
        optimizer = make_optimizer(backbone, head, lr, momentum, weight_decay)
    opt = optimizer
    anchor = ([p.detach().clone() for p in backbone.parameters()] if proximal_mu > 0 else None)
    backbone.train()
    head.train()
    x_all = images if isinstance(images, torch.Tensor) else to_tensor(images)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n = len(x_all)
    bs = min(batch_size, n)

    def shuffled(g: torch.Generator):
        order = torch.randperm(n, generator=g)
        stop = (n // bs) * bs if n >= bs else n
        for start in range(0, stop, bs):
            yield order[start : start + bs]

    decoupled = forward is not None and anchor is not None
    batches = batches or shuffled
    forward = forward or (lambda x, y: head(backbone(x), y))
    augmentation = augmentation or augment

    def proximal_step() -> None:
        """FedProx's pull towards the round's start, outside the private gradient."""
        if not decoupled:
            return
        with torch.no_grad():
            group_lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
            for p, a in zip(backbone.parameters(), anchor):
                p.sub_(group_lr.get(id(p), lr) * proximal_mu * (p - a))
    total_loss, seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        for idx in batches(gen):
            if len(idx) == 0:  # Poisson drew nobody (DP-SGD)
                if on_empty is not None:
                    on_empty()  # the step is still taken: noise alone
                    proximal_step()
                    steps += 1
                continue
            x = augmentation(x_all[idx], gen)
            y = y_all[idx]
            loss = F.cross_entropy(forward(x, y), y)
            if anchor is not None and not decoupled:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(backbone.parameters(), anchor))
                loss = loss + 0.5 * proximal_mu * prox
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"Training loss became {loss.item()} at step {steps}: lower the learning "
                    f"rate (now {opt.param_groups[0]['lr']:.3g})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            proximal_step()
            total_loss += loss.item() * len(idx)
            seen += len(idx)
            steps += 1
            if on_step is not None:
                on_step(loss.item())
    return TrainResult(total_loss / max(seen, 1), seen, steps, time.time() - t0)


def verify_pairs(
    backbone: nn.Module,
    images: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    same: np.ndarray,
    folds: np.ndarray | None = None,
    flip: bool = False,
) -> dict:
    """Verification report of ``backbone`` on pairs of ``images`` (see eval docs).

    Without protocol folds, pairs are dealt round-robin into 10 folds, so that every fold
    holds both kinds whatever the pairs' order.
    """
    if folds is None:
        folds = np.arange(len(same)) % 10
    emb = embed(backbone, images, flip=flip)
    return verification_report(pair_scores(emb[a], emb[b]), same, folds)


def raw_pixel_pairs(images, a, b, same, folds=None) -> dict:
    """The non-learned reference: the same protocol on raw aligned pixels."""
    emb = raw_pixel_embed(images)
    return verification_report(pair_scores(emb[a], emb[b]), same, folds)


def evaluate_pairsets(backbone: nn.Module, pairsets, flip: bool = False,
                      reference: bool = True) -> dict:
    """``{pairset name: report}`` for the learned model, and ``raw_pixels`` reference.

    The reference applies the same protocol to raw aligned pixels, so every report shows
    how far the learned model is above a non-learned matcher.
    """
    out: dict = {}
    for ps in pairsets:
        rep = verify_pairs(backbone, ps.images, ps.a, ps.b, ps.same, ps.folds, flip=flip)
        if reference:
            rep["raw_pixels"] = raw_pixel_pairs(ps.images, ps.a, ps.b, ps.same, ps.folds)
        out[ps.name] = rep
    return out


def round_test_metrics(cfg, backbone: nn.Module, pairsets, rnd: int) -> dict:
    """Per-round test figures on the first evaluation set (every ``cfg.eval_every`` rounds).

    Returns ``{}`` on rounds without evaluation, so callers can ``record.update`` it.
    """
    if not pairsets or not (rnd % max(cfg.eval_every, 1) == 0 or rnd == cfg.rounds):
        return {}
    ps = pairsets[0]
    rep = verify_pairs(backbone, ps.images, ps.a, ps.b, ps.same, ps.folds, cfg.flip_tta)
    return {"test_set": ps.name, "test_accuracy": rep["accuracy"], "test_auc": rep["auc"]}
