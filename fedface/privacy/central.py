"""Client-level (central) differential privacy for the federated backbone.

Two places can clip and noise client updates:

- ``server-fixed`` / ``server-adaptive``: Flower's
  ``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping`` wrap the strategy; the
  server clips each plaintext update to ``central-dp-clip`` and adds Gaussian noise of
  std ``noise x clip / m`` to the mean of ``m`` updates. Needs plaintext updates.
- ``client-fixed``: every client clips its own update (:func:`clip_and_noise_update`)
  and adds its share of the noise, std ``noise x clip / sqrt(m)``, so the sum of ``m``
  shares carries std ``noise x clip``, the same as the server-side mechanism. The
  server only averages, so this works when it cannot see updates (encrypted
  aggregation).

Both give client-level DP when the aggregate is an unweighted mean; fedface switches
the strategies to uniform client weights whenever central DP is on. The epsilon is
accounted with Opacus' RDP accountant over rounds, with the client sampling rate as
the sampling probability (:func:`central_epsilon`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from fedface.privacy.budget import PrivacyConfigError, default_delta


def update_norm(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
    """L2 norm of ``after - before`` over all arrays (float64)."""
    return math.sqrt(sum(float(np.square(after[k].astype(np.float64) - before[k]).sum())
                         for k in before))


def clip_and_noise_update(before: dict[str, np.ndarray], after: dict[str, np.ndarray], *,
                          clip: float, noise_multiplier: float, num_sampled_clients: int,
                          rng: np.random.Generator) -> tuple[dict[str, np.ndarray], float]:
    """Client side of central DP: clip the update to ``clip``, add this client's share of
    the noise, return the new weights and the update's norm before clipping.

    The share has std ``noise_multiplier * clip / sqrt(num_sampled_clients)``; the mean of
    ``m`` such updates then carries the noise of the server-side mechanism,
    ``noise_multiplier * clip / m``.
    """
    if clip <= 0:
        raise PrivacyConfigError(f"central-dp-clip={clip}: must be > 0")
    norm = update_norm(before, after)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    std = noise_multiplier * clip / math.sqrt(max(num_sampled_clients, 1))
    out = {}
    for k, b in before.items():
        delta = (after[k].astype(np.float64) - b) * scale
        if np.issubdtype(b.dtype, np.floating):
            delta = delta + rng.normal(0.0, std, size=b.shape)
        out[k] = (b + delta).astype(b.dtype)
    return out, norm


def central_epsilon(noise_multiplier: float, sample_rate: float, rounds: int,
                    delta: float) -> float:
    """Client-level epsilon after ``rounds`` releases at ``noise_multiplier`` with clients
    sampled at ``sample_rate`` (RDP accountant; inf when there is no noise)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, rounds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def central_delta(num_clients: int, delta: float = 0.0) -> float:
    """Client-level delta: ``delta`` if set, else ``min(1e-5, 1/(10 K))`` for K clients."""
    return delta if delta > 0 else default_delta(num_clients)
