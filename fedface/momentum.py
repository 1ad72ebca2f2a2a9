"""Partially federated momentum (PFM): the one implementation of its two steps.

Our reading of Bai et al. (arXiv 2105.02501): clients run ordinary momentum SGD, but the
backbone's momentum buffer does not restart from zero every round (as in FedAvg, where
each round's first steps crawl until the buffer has built up again, and where every
client's buffer points along its own people only). Instead every client starts the round
from an estimate of the momentum buffer that *centralized* momentum SGD would hold after
the federation's last round: the "equivalent global momentum", kept over the federated
backbone only. The heads keep ordinary local momentum.

- :func:`momentum_update` (after each round's aggregation) estimates that buffer from
  the round alone: the global weights before and after it, the round's learning rate,
  its (sample-weighted) number of local steps ``s`` and the buffer ``v0`` the clients
  started from. With heavy-ball steps ``v_t = beta v_{t-1} + g``, ``w_t = w_{t-1} - lr v_t``
  and an average gradient ``g`` over the round, the round moves the weights by
  ``lr (B v0 + A g)`` with ``B = sum_{t=1..s} beta^t`` and
  ``A = sum_{t=1..s} (1 - beta^t) / (1 - beta)``; solving for ``g`` gives the buffer at
  the end of the round, ``v_s = beta^s v0 + (1 - beta^s) / (1 - beta) g``. It needs
  only plaintext round metadata and the global model, so it runs unchanged on the server
  (plaintext aggregation) or on every client after decrypting an encrypted aggregate.
- :func:`seed_momentum` (on a client, before its first local step) puts that buffer into
  the optimizer's state for the backbone's parameters; every local step then applies it
  (``v <- beta v + g``). The head, which never leaves its client, keeps its own buffer
  from round to round (:func:`momentum_of` reads it back after the round). So under PFM
  no momentum ever restarts: the backbone's part is federated, the head's stays local.

In round 1 (no estimate yet) PFM is FedAvg with local momentum ``beta``; ``beta = 0``
turns PFM off (clients then train as under FedAvg).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn


def round_sums(steps: float, beta: float) -> tuple[float, float]:
    """``(A, B)`` of the module docstring for ``steps`` heavy-ball steps at ``beta``."""
    b_s = beta ** steps
    big_b = beta * (1.0 - b_s) / (1.0 - beta)
    return (steps - big_b) / (1.0 - beta), big_b


def momentum_update(momentum: Mapping[str, np.ndarray] | None,
                    before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray],
                    lr: float, steps: float, beta: float) -> dict[str, np.ndarray]:
    """The equivalent global momentum buffer at the end of a round (module docstring).

    Parameters
    ----------
    momentum : mapping or None
        The buffer the clients started the round from (None in round 1: zero).
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
    big_a, big_b = round_sums(float(steps), float(beta))
    keep = np.float32(beta ** float(steps))
    gain = np.float32((1.0 - beta ** float(steps)) / (1.0 - beta))
    out = {}
    for k, b in before.items():
        if np.asarray(b).dtype.kind != "f":
            continue
        moved = (np.asarray(b, np.float32) - np.asarray(after[k], np.float32)) / np.float32(lr)
        v0 = (momentum or {}).get(k)
        v0 = np.zeros_like(moved) if v0 is None else np.asarray(v0, np.float32)
        g = (moved - np.float32(big_b) * v0) / np.float32(big_a)
        out[k] = keep * v0 + gain * g
    return out


def seed_momentum(optimizer: torch.optim.Optimizer, module: nn.Module,
                  momentum: Mapping[str, np.ndarray]) -> None:
    """Start ``optimizer``'s momentum buffers for ``module``'s parameters at ``momentum``.

    ``optimizer`` is a ``torch.optim.SGD`` (or a DP wrapper exposing
    ``original_optimizer``) whose group holding ``module``'s parameters has momentum
    ``beta``: its first step then computes ``beta * momentum + grad``, as centralized
    momentum SGD would.
    """
    opt = getattr(optimizer, "original_optimizer", optimizer)
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(momentum))
    if missing:
        raise ValueError(f"PFM momentum lacks parameters {missing[:3]}: server and client "
                         "backbones differ")
    for k, p in params.items():
        m = torch.as_tensor(np.asarray(momentum[k], np.float32))
        if tuple(m.shape) != tuple(p.shape):
            raise ValueError(f"PFM momentum {k} has shape {tuple(m.shape)}, the backbone "
                             f"{tuple(p.shape)}: server and client backbones differ")
        opt.state[p]["momentum_buffer"] = m.to(p.dtype).clone()


def momentum_of(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, np.ndarray]:
    """``optimizer``'s momentum buffers for ``module``'s parameters (those it has)."""
    opt = getattr(optimizer, "original_optimizer", optimizer)
    out = {}
    for k, p in module.named_parameters():
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[k] = buf.detach().cpu().numpy().copy()
    return out


def norm(momentum: Mapping[str, np.ndarray] | None) -> float:
    """L2 norm of a dict of arrays, e.g. a momentum or an update (float64; 0 when empty):
    the one such norm fedface computes."""
    if not momentum:
        return 0.0
    return float(np.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in momentum.values())))
