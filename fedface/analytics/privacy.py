"""Output privacy of a query: distributed Skellam noise, a per-site budget, small cells.

**Distributed noise.** Every site adds integer noise to its own vector before masking it,
so that the *sum* carries the target noise and no one ever sees a noise-free total. The
noise is Skellam (the difference of two Poisson draws): a sum of Skellam draws is Skellam
again, exactly, so ``k`` sites each adding ``Sk(mu / k)`` give ``Sk(mu)`` whatever their
number, on integers, where fixed-point sums live (Agarwal, Kairouz and Liu, "The Skellam
Mechanism for Differentially Private Federated Learning", NeurIPS 2021).

**Sensitivity.** The unit of privacy is one row of a site's table. Adding or removing a row
moves, in its group only, the count by 1, each histogram by 1 in one bin, and a sum of a
column by at most the largest magnitude of its declared range (values are clipped to it),
a sum of squares by its square (:func:`sensitivities`, in the vector's fixed-point units).
Coordinate ``j`` gets noise ``Sk(mu * c_j**2)`` for its sensitivity ``c_j``: divided by
``c_j`` it is the unit-sensitivity Skellam mechanism, whose Renyi DP (Theorem 3.5 of the
paper, with both sensitivities 1) is at most

    alpha / (4 mu) + min(((2 alpha - 1) + 6) / (16 mu**2), 3 / (4 mu))

per coordinate a row moves; the ``F`` coordinates one row can move compose
(:func:`skellam_epsilon`), and Opacus' conversion turns the Renyi curve into
``(epsilon, delta)``. :func:`calibrate` finds the smallest ``mu`` within a target epsilon.

**Dropouts.** A site cannot know how many of the others will still be in the sum, so it
adds the share of the *smallest* set of sites a query can complete with (``needed``, the
masks' threshold): the released total carries at least the target noise, and more when
nobody drops.

**Budget.** :class:`SiteBudget` is a site's own ledger (a JSON file in its state folder):
each DP query charges its epsilon *before* the site's noisy vector leaves, and a query
that would overspend is refused there, whatever the querier asks.

**Small cells.** :func:`suppress` blanks, in the released (noisy) totals, every group whose
count is below ``min_cell`` and every histogram bin below it.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedface.analytics.query import QueryError

__all__ = ["BudgetExhausted", "SiteBudget", "calibrate", "sensitivities", "skellam_epsilon",
           "skellam_noise", "suppress"]

ORDERS = [1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128,
          192, 256, 512]


class BudgetExhausted(PermissionError):
    """A site's privacy budget would be overspent by this query: refused there."""


def _rdp(mu: float, moved: int) -> np.ndarray:
    a = np.asarray(ORDERS, dtype=float)
    return moved * (a / (4 * mu) + np.minimum(((2 * a - 1) + 6) / (16 * mu ** 2), 3 / (4 * mu)))


def _epsilon(rdp: np.ndarray, delta: float) -> float:
    """Renyi DP -> (epsilon, delta): the conversion Opacus uses (Balle et al. 2020)."""
    a = np.asarray(ORDERS, dtype=float)
    eps = rdp - (np.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    return float(np.nanmin(eps))


def skellam_epsilon(mu: float, moved: int, delta: float) -> float:
    """Epsilon of the Skellam mechanism with parameter ``mu`` (variance ``2 mu`` per
    unit-sensitivity coordinate) when one row moves ``moved`` coordinates by their
    sensitivity (Opacus' ``get_privacy_spent`` on the Renyi curve)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=list(_rdp(mu, moved)), delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=256)
def calibrate(epsilon: float, delta: float, moved: int) -> float:
    """The smallest ``mu`` (to 0.1 %) whose epsilon is at most ``epsilon`` (checked with
    :func:`skellam_epsilon` at the end)."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise QueryError(f"epsilon={epsilon}: use a positive number (or 0 for no noise)")
    if not 0 < delta < 1:
        raise QueryError(f"delta={delta}: use a number in (0, 1), e.g. 1e-6")
    lo, hi = 1e-3, 1.0
    while _epsilon(_rdp(hi, moved), delta) > epsilon:
        lo, hi = hi, hi * 4
        if hi > 1e12:
            raise QueryError(f"epsilon={epsilon} cannot be reached: raise it")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _epsilon(_rdp(mid, moved), delta) > epsilon else (lo, mid)
    if skellam_epsilon(hi, moved, delta) > epsilon * 1.0001:
        raise QueryError(f"the noise calibration for epsilon={epsilon} does not check out")
    return hi


def sensitivities(layout, ranges: dict[str, tuple[float, float]]) -> tuple[np.ndarray, int]:
    """Per coordinate of ``layout``'s vector, what one row can move it by (in its units),
    and how many coordinates one row moves (one group's figures, one bin per histogram).
    A summed column without a declared range is refused: its sensitivity is unbounded."""
    per_figure, families = [], set()
    missing = []
    for f, scale in zip(layout.figures, layout.scales, strict=True):
        if f.kind in ("count", "n", "bin"):
            c = 1
        else:
            if f.column not in ranges:
                missing.append(f.column)
                continue
            lo, hi = ranges[f.column]
            m = max(abs(lo), abs(hi))
            c = max(1, math.ceil(scale * (m if f.kind == "sum" else m * m)))
        per_figure.append(c)
        families.add((f.kind, f.column, f.edges) if f.kind == "bin" else (f.kind, f.column))
    if missing:
        cols = ", ".join(sorted(set(missing)))
        raise QueryError(f"differential privacy needs a declared range for every summed "
                         f"column ({cols}): add \"range\": [low, high] to the schema")
    moved = len(families)
    return np.tile(np.asarray(per_figure, dtype=np.float64), len(layout.groups)), moved


def skellam_noise(rng: np.random.Generator, variance_units: np.ndarray, mu: float,
                  shares: int) -> np.ndarray:
    """One site's share of the noise: ``Sk(mu * c**2 / shares)`` per coordinate (int64)."""
    lam = mu * np.square(variance_units) / max(1, shares)
    return (rng.poisson(lam) - rng.poisson(lam)).astype(np.int64)


@dataclass
class SiteBudget:
    """A site's privacy ledger.

    Parameters
    ----------
    path : Path
        The JSON file (in the site's state folder; created on the first charge).
    total : float
        Epsilon the site spends across all queries (``analytics-budget``).
    """

    path: Path
    total: float

    def _read(self) -> dict:
        if not self.path.exists():
            return {"entries": []}
        try:
            doc = json.loads(self.path.read_text())
            if not isinstance(doc.get("entries"), list):
                raise ValueError("no entries")
        except ValueError as err:
            raise BudgetExhausted(f"the site's privacy ledger {self.path} is unreadable ({err}): "
                                  "restore it; until then the site answers no query") from None
        return doc

    @property
    def spent(self) -> float:
        return float(sum(e["epsilon"] for e in self._read()["entries"]))

    def charge(self, query: str, digest: str, epsilon: float, delta: float) -> float:
        """Record ``epsilon`` (and ``delta``) for ``query`` (its signed document hashes to
        ``digest``), or raise :class:`BudgetExhausted`; returns what is left. The same
        query is charged once; its id reused for another document is refused."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            doc = self._read()
            spent = sum(e["epsilon"] for e in doc["entries"])
            seen = [e for e in doc["entries"] if e["query"] == query]
            if seen and seen[0].get("digest") == digest:
                return self.total - spent
            if seen:
                raise BudgetExhausted(f"query id {query} was answered before for another query "
                                      "document: refused (a reused id must not get fresh noise "
                                      "for free)")
            if spent + epsilon > self.total + 1e-12:
                raise BudgetExhausted(
                    f"privacy budget spent: this site has used epsilon {spent:.3g} of "
                    f"{self.total:.3g}, and this query asks {epsilon:.3g} more; refused here "
                    "(the site's analytics-budget decides)")
            doc["entries"].append({"query": query, "digest": digest, "epsilon": float(epsilon),
                                   "delta": float(delta), "time": time.time()})
            from fedface.io import atomic_write_text

            atomic_write_text(self.path, json.dumps(doc, indent=1))
        return self.total - spent - epsilon


def suppress(groups: dict[tuple, dict[str, Any]], counts: dict[tuple, float], min_cell: int
             ) -> tuple[dict, list]:
    """Released statistics with small cells blanked: groups whose (noisy) row count in
    ``counts`` is below ``min_cell`` are dropped (listed in the second value), histogram
    bins below it become ``None``."""
    if min_cell <= 0:
        return groups, []
    kept, dropped = {}, []
    for key, stats in groups.items():
        if counts.get(key, 0) < min_cell:
            dropped.append(key)
            continue
        out = dict(stats)
        for name, v in stats.items():
            if isinstance(v, dict) and "counts" in v:
                out[name] = {**v, "counts": [c if c >= min_cell else None for c in v["counts"]]}
        kept[key] = out
    return kept, dropped
