"""Partially federated momentum (PFM): the one implementation of its two steps.

Our reading of Bai et al. (arXiv 2105.02501), close to MimeLite (Karimireddy et al.,
arXiv 2008.03606): a global heavy-ball momentum ``m`` over the federated backbone only,
in units of a gradient.

- :func:`momentum_update` (after each round's aggregation):
  ``g = (w_before - w_after) / (lr * steps)`` is the round's average update per local
  step. Clients already applied ``beta * m_old`` in each of those steps, so the fresh
  gradient is ``g - beta * m_old`` and the heavy-ball update
  ``m <- beta * m_old + (g - beta * m_old)`` is simply ``m <- g``: one momentum step
  per round. (Adding ``beta * m_old`` once more counts the momentum twice and diverges,
  ``m_r ~ 2 beta m_{r-1}``; jumping to the steady state ``(g - beta * m_old) / (1 - beta)``
  amplifies round-to-round noise tenfold and oscillated in our runs.) In round 1 clients
  train with ordinary local momentum, so ``g`` already carries its amplification. The
  update needs only the global weights before and after the round and plaintext round
  metadata, so it runs unchanged on the server (plaintext aggregation) or on every
  client after decrypting an encrypted aggregate.
- :class:`MomentumHook` (every local step on a client, ``m`` held fixed):
  ``grad <- grad + beta * m`` for backbone parameters, which then take plain SGD steps
  (``w <- w - lr * (g + beta * m)``); the client's head keeps its ordinary local momentum.
  Across rounds ``m`` approaches ``g / (1 - beta)``, the effective step of momentum SGD,
  pointing along the federation's gradient rather than the client's own.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


def momentum_update(momentum: Mapping[str, np.ndarray] | None,
                    before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray],
                    lr: float, steps: float, beta: float) -> dict[str, np.ndarray]:
    """New global momentum from one round (see module docstring).

    Parameters
    ----------
    momentum : mapping or None
        Momentum the clients applied during the round (None in round 1); it is already
        contained in the round's update, which is why it is not added again.
    before, after : mapping
        Global backbone before the round and after aggregation (float arrays only are used).
    lr : float
        Local learning rate of the round.
    steps : float
        Local steps per client in the round (sample-weighted mean).
    beta : float
        Momentum coefficient in [0, 1).
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"PFM momentum beta={beta} must be in [0, 1)")
    if lr <= 0 or steps <= 0:
        raise ValueError(f"PFM needs a positive lr and step count (lr={lr}, steps={steps})")
    scale = 1.0 / (lr * steps)
    out = {}
    for k, b in before.items():
        if np.asarray(b).dtype.kind != "f":
            continue
        g = (np.asarray(b, np.float32) - np.asarray(after[k], np.float32)) * np.float32(scale)
        out[k] = g  # = beta * m_old + (g - beta * m_old): see the module docstring
    return out


class MomentumHook:
    """Applies a fixed global momentum to a module's gradients before each step."""

    def __init__(self, module: nn.Module, momentum: Mapping[str, np.ndarray], beta: float):
        params = dict(module.named_parameters())
        missing = sorted(set(params) - set(momentum))
        if missing:
            raise ValueError(f"PFM momentum lacks parameters {missing[:3]}: server and client "
                             "backbones differ")
        self.pairs = [(params[k], torch.as_tensor(np.asarray(momentum[k]))) for k in params]
        self.beta = float(beta)

    def __call__(self) -> None:
        for p, m in self.pairs:
            if p.grad is not None:
                p.grad.add_(m, alpha=self.beta)


def norm(momentum: Mapping[str, np.ndarray] | None) -> float:
    """L2 norm of a momentum (0 when empty)."""
    if not momentum:
        return 0.0
    return float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in momentum.values())))
