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

from fedface.momentum import norm
from fedface.privacy.budget import PrivacyConfigError, default_delta


def update_norm(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
    """L2 norm of ``after - before`` over all arrays (float64; :func:`fedface.momentum.norm`)."""
    return norm({k: after[k].astype(np.float64) - before[k] for k in before})


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


def central_epsilon(noise_multiplier: float | list[float], sample_rate: float,
                    rounds: int | None, delta: float) -> float:
    """Client-level epsilon after ``rounds`` releases at ``noise_multiplier`` with clients
    sampled at ``sample_rate`` (RDP accountant; inf when any release has no noise).

    ``noise_multiplier`` may be the list of every release's own (effective) multiplier,
    see :func:`effective_noise_multiplier`; ``rounds`` is then its length.
    """
    sigmas = ([float(noise_multiplier)] * int(rounds or 0)
              if not isinstance(noise_multiplier, (list, tuple)) else
              [float(z) for z in noise_multiplier])
    if not sigmas:
        return 0.0
    if min(sigmas) <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    merged: dict[float, int] = {}
    for z in sigmas:
        merged[z] = merged.get(z, 0) + 1
    acc = RDPAccountant()
    acc.history = [(z, sample_rate, n) for z, n in merged.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def effective_noise_multiplier(mode: str, noise_multiplier: float, sampled: int,
                               aggregated: int, insider: bool = True) -> float:
    """The noise multiplier a release really carries when ``aggregated`` of the
    ``sampled`` clients the noise was calibrated for made it into the mean.

    - ``server-*``: Flower adds std ``z C / m`` to the mean of ``r`` updates, whose
      sensitivity to one client is ``C / r``: ``z_eff = z r / m``.
    - ``client-fixed``: each of the ``r`` replies carries std ``z C / sqrt(m)``, so their
      sum carries ``z C sqrt(r / m)`` against a sensitivity of ``C``:
      ``z_eff = z sqrt(r / m)`` against the server and anyone who sees the model. A fellow
      institution (``insider=True``, the default: it decrypts every aggregate) knows its
      own share and subtracts it: ``z_eff = z sqrt((r - 1) / m)``.

    With every sampled client in the mean the server-side figure equals ``z``; with
    fewer, less noise protects each of them, and the epsilon must be accounted at
    ``z_eff``.
    """
    if sampled <= 0 or aggregated <= 0:
        return float(noise_multiplier)
    if mode == "client-fixed":
        others = aggregated - 1 if insider else aggregated
        return float(noise_multiplier) * math.sqrt(max(others, 0) / sampled)
    return float(noise_multiplier) * min(1.0, aggregated / sampled)


def central_delta(num_clients: int, delta: float = 0.0) -> float:
    """Client-level delta: ``delta`` if set, else ``min(1e-5, 1/(10 K))`` for K clients."""
    return delta if delta > 0 else default_delta(num_clients)
