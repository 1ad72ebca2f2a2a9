"""What a run reports about privacy: the DP-SGD plans checked before round 1, and each
round's figures (epsilon spent per client, declines, central DP at its effective noise).

The server's round loop calls these; they read replies through the wire schema
(:mod:`fedface.protocol`) and excluded-reply records by their typed ``code``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedface.models import initial_backbone
from fedface.privacy.budget import check_run
from fedface.privacy.central import central_delta, central_epsilon, effective_noise_multiplier
from fedface.privacy.engine import check_dp_compatible
from fedface.protocol import CLIENT_ID, DP_EPSILON_SPENT, ERR_DP_BUDGET_SPENT, METRICS

if TYPE_CHECKING:
    from fedface.config import RunConfig


def sampled_clients(cfg: RunConfig) -> int:
    """Clients asked to train each round (Flower's FedAvg sampling rule): the ``m`` that
    central DP's noise is calibrated to."""
    n = cfg.num_clients
    return min(n, max(int(n * cfg.fraction_train), min(cfg.min_train_nodes, n)))


def check_privacy(cfg: RunConfig, summary: dict) -> dict:
    """Refuse impossible DP settings before round 1; the plans as run metadata."""
    if cfg.dp_epsilon <= 0:
        return {}
    check_dp_compatible(initial_backbone(cfg), f"backbone {cfg.backbone!r}")
    sizes = {int(c["client"]): (int(c["train_images"]), int(c["train_identities"]))
             for c in summary.get("clients", [])}
    plans = check_run(cfg, sizes)
    return {str(cid): {"noise_multiplier": round(p.noise_multiplier, 4), "delta": p.delta,
                       "sample_rate": round(p.sample_rate, 5), "steps_per_round": p.steps_per_round,
                       "target_epsilon": p.target_epsilon, "planned_rounds": p.planned_rounds,
                       "unit": p.unit, "units": p.num_examples,
                       "images_per_unit": p.images_per_unit}
            for cid, p in plans.items()}


def declined(excluded: list[dict]) -> int:
    """Replies that declined the round because the client's privacy budget is spent."""
    return sum(e.get("code") == ERR_DP_BUDGET_SPENT for e in excluded)


def privacy_record(cfg: RunConfig, strategy, good: list, excluded: list, rnd: int,
                   earlier: list[dict] | None = None) -> dict:
    """Per-round privacy figures: epsilon spent per client, declines, central DP.

    ``excluded`` are the round's excluded-reply records (``{"node", "reason"}``, and the
    typed ``code`` of a client's error reply). Central DP is accounted at each release's
    effective noise multiplier: the noise is calibrated to the ``m`` clients sampled, and
    a round that aggregates fewer replies (dropouts, screened-out updates) protects each
    of them with less (:func:`fedface.privacy.effective_noise_multiplier`); ``earlier``
    are the run's previous round records, whose multipliers compose with this one.
    ``strategy`` gives the clip of server-side clipping (adaptive clipping moves it).
    """
    out: dict = {}
    if cfg.dp_epsilon > 0:
        spent = {str(int(m.content[METRICS][CLIENT_ID])):
                 round(float(m.content[METRICS][DP_EPSILON_SPENT]), 4)
                 for m in good if DP_EPSILON_SPENT in m.content[METRICS]}
        out["dp"] = {"epsilon_spent": spent, "epsilon_max": max(spent.values(), default=0.0),
                     "declined": declined(excluded)}
    if cfg.central_dp != "off":
        m = sampled_clients(cfg)
        delta = central_delta(cfg.num_clients)
        z_eff = effective_noise_multiplier(cfg.central_dp, cfg.central_dp_noise, m, len(good))
        sigmas = [float(r["central_dp"]["noise_multiplier_effective"])
                  for r in (earlier or []) if "central_dp" in r] + [z_eff]
        # No amplification by sampling: who takes part is visible to the server and,
        # through the aggregate's senders, to every institution.
        q = 1.0
        out["central_dp"] = {
            "mode": cfg.central_dp, "noise_multiplier": cfg.central_dp_noise,
            "noise_multiplier_effective": z_eff, "sampled": m, "aggregated": len(good),
            "clip": float(getattr(strategy, "clipping_norm", cfg.central_dp_clip)),
            "delta": delta,
            "epsilon": central_epsilon(sigmas, q, None, delta),
            "epsilon_if_all_replied": central_epsilon(cfg.central_dp_noise, q, len(sigmas),
                                                      delta)}
    return out
