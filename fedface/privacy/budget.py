"""Per-client privacy budgets for DP-SGD: plan the noise, account every round, persist.

A client is given a target ``epsilon`` at ``delta`` for the whole federation (all the
rounds it may join). :func:`plan_dp` turns that into a noise multiplier for its data
size, batch size and local epochs; :class:`PrivacyLedger` records every round it really
trained and refuses a round that would overspend. The ledger is a JSON file (next to
the client's data or in its state folder), so a restarted client still knows what it
has spent.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedface.config import ACCOUNTANTS, DP_UNITS
from fedface.io import atomic_write_text
from fedface.protocol import DP_BUDGET_SPENT


class PrivacyConfigError(ValueError):
    """DP settings that cannot be honoured (refused before any training)."""


class PrivacyBudgetExhausted(RuntimeError):
    """The next round would spend more than the client's budget."""

    MARKER = DP_BUDGET_SPENT


@dataclass(frozen=True)
class DPPlan:
    """How one client trains privately: derived from its budget and data size.

    Attributes
    ----------
    target_epsilon, delta : float
        The budget for all planned rounds.
    noise_multiplier : float
        Gaussian noise std over the clipping norm, derived so that ``planned_rounds``
        rounds of ``steps_per_round`` steps at ``sample_rate`` spend ``target_epsilon``.
    max_grad_norm : float
        Clipping norm of one unit's contribution to a step (an image's gradient, or the
        sum of a person's image gradients).
    sample_rate : float
        Poisson sampling rate ``batch_size / num_examples``.
    steps_per_round : int
        DP-SGD steps per round (local epochs x ``1 / sample_rate``).
    planned_rounds : int
        Rounds the budget covers.
    accountant : str
        ``"prv"`` or ``"rdp"``.
    num_examples, batch_size : int
        The client's privacy units (training images, or people) and expected units per
        step.
    unit : str
        ``"image"`` (record-level DP) or ``"person"`` (all of a person's images).
    images_per_unit : int
        Most images one unit contributes to a step (1 for images).
    """

    target_epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps_per_round: int
    planned_rounds: int
    accountant: str
    num_examples: int
    batch_size: int
    unit: str = "image"
    images_per_unit: int = 1

    @property
    def image_clip(self) -> float:
        """Clipping norm of one image's gradient: a unit's images sum to at most
        ``max_grad_norm``."""
        return self.max_grad_norm / self.images_per_unit

    @property
    def image_noise_multiplier(self) -> float:
        """Noise std over ``image_clip`` (the same noise, ``noise_multiplier x
        max_grad_norm``, in per-image units)."""
        return self.noise_multiplier * self.images_per_unit


def default_delta(num_examples: int) -> float:
    """``min(1e-5, 1 / (10 N))``: well below ``1/N`` for any data size."""
    return min(1e-5, 1.0 / (10.0 * max(num_examples, 1)))


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` after steps ``[(noise_multiplier, sample_rate, steps), ...]``."""
    if not history:
        return 0.0
    merged: dict[tuple[float, float], int] = {}  # same (sigma, q): one composition
    for sigma, q, steps in history:
        merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    from opacus.accountants import create_accountant  # (opacus loads in ~1 s: when used)

    acc = create_accountant(mechanism=accountant)
    acc.history = [(s, q, n) for (s, q), n in merged.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def _noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str) -> float:
    """Smallest noise multiplier whose ``steps`` steps spend at most ``epsilon``.

    Solved with RDP first (closed form: fast and robust), then, for PRV, refined by
    bisection between 0.6x and 1x of that value: RDP is the looser bound, so the answer
    lies there. (Opacus' own PRV search starts from extreme noise levels, where PRV's
    numerical integration can take minutes.)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from opacus.accountants.utils import get_noise_multiplier

        sigma = float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                           sample_rate=sample_rate, steps=steps,
                                           accountant="rdp", epsilon_tolerance=0.005))
    if accountant == "rdp":
        return sigma
    lo, hi = 0.6 * sigma, sigma
    if epsilon_of([(lo, sample_rate, steps)], delta, accountant) <= epsilon:
        return lo
    while hi - lo > 0.002 * hi:
        mid = 0.5 * (lo + hi)
        if epsilon_of([(mid, sample_rate, steps)], delta, accountant) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def plan_dp(num_examples: int, *, epsilon: float, delta: float = 0.0, rounds: int,
            local_epochs: int, batch_size: int, max_grad_norm: float = 1.0,
            accountant: str = "prv", max_noise_multiplier: float = 20.0,
            client: str = "this client", unit: str = "image",
            images_per_unit: int = 1) -> DPPlan:
    """Derive a client's DP-SGD plan from its budget; refuse settings that cannot work.

    Parameters
    ----------
    num_examples : int
        The client's privacy units (N): training images, or people with ``unit="person"``.
    epsilon : float
        Target epsilon for all ``rounds`` (> 0).
    delta : float
        Target delta; 0 picks :func:`default_delta`. Must be below ``1/N``.
    rounds, local_epochs, batch_size : int
        Planned rounds this client may join, local epochs per round, expected batch.
    max_grad_norm : float
        Per-sample clipping norm.
    accountant : str
        ``"prv"`` (default, tighter) or ``"rdp"``.
    max_noise_multiplier : float
        A budget that needs more noise than this is refused: every step would be noise.
    client : str
        Named in error messages.
    unit : str
        ``"image"`` (record-level) or ``"person"`` (``batch_size`` then counts people).
    images_per_unit : int
        Most images a sampled unit contributes to one step (``"person"``).
    """
    if unit not in DP_UNITS:
        raise PrivacyConfigError(f"dp-unit={unit!r}: use one of {DP_UNITS}")
    if images_per_unit < 1 or (unit == "image" and images_per_unit != 1):
        raise PrivacyConfigError(f"dp-person-images={images_per_unit}: an image unit has 1 "
                                 "image; a person unit needs at least 1")
    what = "training images" if unit == "image" else "people in training"
    where = f"{client} (N={num_examples} {what})"
    if accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(f"dp-accountant={accountant!r}: use one of {ACCOUNTANTS}")
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise PrivacyConfigError(f"dp-epsilon={epsilon}: use a finite value > 0 "
                                 "(0 turns DP-SGD off)")
    if max_grad_norm <= 0:
        raise PrivacyConfigError(f"dp-clip={max_grad_norm}: the clipping norm must be > 0")
    if num_examples < 2:
        raise PrivacyConfigError(f"{where}: DP-SGD needs at least 2 {what}")
    delta = delta if delta > 0 else default_delta(num_examples)
    if delta >= 1.0 / num_examples:
        raise PrivacyConfigError(
            f"{where}: dp-delta={delta:g} is not below 1/N={1.0 / num_examples:.3g}, so it "
            f"would allow leaking a whole record; use dp-delta <= {0.1 / num_examples:.2g} "
            "or 0 for the default min(1e-5, 1/(10N))")
    if batch_size >= num_examples:
        fix = (f"use --batch-size {max(2, num_examples // 4)} or less" if num_examples > 2 else
               f"batches need at least 2, so this client has too few {what} for Poisson-"
               "sampled DP-SGD: give it more data" +
               (", or protect images (dp-unit=image)" if unit == "person" else ""))
        raise PrivacyConfigError(
            f"{where}: batch-size={batch_size} is not below N, so Poisson sampling (rate "
            f"batch/N = {batch_size / num_examples:.2f}, must be < 1) cannot honour it and "
            f"there is no subsampling to amplify privacy; {fix}")
    sample_rate = batch_size / num_examples
    steps_per_round = local_epochs * int(1.0 / sample_rate)
    total = rounds * steps_per_round
    try:
        sigma = _noise_multiplier(float(epsilon), float(delta), float(sample_rate), int(total),
                                  accountant)
    except ValueError as e:
        raise PrivacyConfigError(
            f"{where}: epsilon={epsilon} is too small for even one round of {steps_per_round} "
            f"steps at any noise level ({e}). Raise dp-epsilon, plan fewer rounds "
            "(dp-rounds) or local epochs, or lower the batch size") from None
    if sigma > max_noise_multiplier:
        raise PrivacyConfigError(
            f"{where}: epsilon={epsilon} over {rounds} rounds x {steps_per_round} steps needs "
            f"noise multiplier {sigma:.1f} (> dp-max-noise={max_noise_multiplier:g}): the "
            "budget is too small for useful steps, which would be mostly noise. Raise "
            "dp-epsilon, plan fewer rounds (dp-rounds) or local epochs, or lower the batch size")
    return DPPlan(target_epsilon=float(epsilon), delta=float(delta),
                  noise_multiplier=float(sigma), max_grad_norm=float(max_grad_norm),
                  sample_rate=float(sample_rate), steps_per_round=int(steps_per_round),
                  planned_rounds=int(rounds), accountant=accountant,
                  num_examples=int(num_examples), batch_size=int(batch_size), unit=unit,
                  images_per_unit=int(images_per_unit))


@dataclass
class PrivacyLedger:
    """What one client has spent, round by round, persisted as JSON.

    Attributes
    ----------
    path : str
        The file (written atomically after every round); empty: kept in memory only.
    delta, target_epsilon : float
        The budget (fixed by the first plan; a changed budget is refused).
    accountant : str
        Accountant used to compose the history.
    unit : str
        What the budget protects (``image`` or ``person``): fixed with the budget.
    history : list
        ``[noise_multiplier, sample_rate, steps]`` of every round trained.
    rounds : list
        ``{"round", "steps", "epsilon"}`` per round trained.
    """

    path: str
    delta: float = 0.0
    target_epsilon: float = 0.0
    accountant: str = "prv"
    unit: str = "image"
    history: list = field(default_factory=list)
    rounds: list = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path, fallback_json: str = "") -> PrivacyLedger:
        """The ledger at ``path``; if the file does not exist yet, the ledger in
        ``fallback_json`` (e.g. kept in the node's state) or an empty one."""
        p = Path(path) if path else None
        text = p.read_text() if p is not None and p.is_file() else fallback_json
        if not text:
            return cls(path=str(p or ""))
        try:
            data = json.loads(text)
            return cls(path=str(p or ""), unit=str(data.get("unit", "image")),
                       **{k: data[k] for k in ("delta", "target_epsilon", "accountant",
                                               "history", "rounds")})
        except (ValueError, KeyError, TypeError) as e:
            raise PrivacyConfigError(
                f"Privacy ledger {p} is unreadable ({e}). It records the budget this "
                "client has spent: restore it from a backup; never delete it to reset") from None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "path"}, indent=1)

    @property
    def spent(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant) if self.history else 0.0

    def bind(self, plan: DPPlan) -> None:
        """Fix the budget on first use; refuse a later plan with a different one."""
        if not self.history:
            self.delta, self.target_epsilon = plan.delta, plan.target_epsilon
            self.accountant, self.unit = plan.accountant, plan.unit
            return
        if (abs(self.delta - plan.delta) > 1e-15 or self.target_epsilon != plan.target_epsilon
                or self.accountant != plan.accountant or self.unit != plan.unit):
            raise PrivacyConfigError(
                f"Privacy ledger {self.path} holds a budget of epsilon={self.target_epsilon} at "
                f"delta={self.delta:g} ({self.accountant}, per {self.unit}); this run asks for "
                f"epsilon={plan.target_epsilon} at delta={plan.delta:g} ({plan.accountant}, "
                f"per {plan.unit}). A budget spans the whole federation: keep the same settings")

    def check_next_round(self, plan: DPPlan) -> float:
        """Epsilon after one more round of ``plan``; raises if it exceeds the budget."""
        self.bind(plan)
        step = [plan.noise_multiplier, plan.sample_rate, plan.steps_per_round]
        after = epsilon_of(self.history + [step], self.delta, self.accountant)
        if after > self.target_epsilon * (1 + 1e-3):
            raise PrivacyBudgetExhausted(
                f"{PrivacyBudgetExhausted.MARKER}: {len(self.rounds)} rounds spent "
                f"epsilon={self.spent:.3f} of {self.target_epsilon} (delta={self.delta:g}); "
                f"another round would reach {after:.3f}. This client declines to train "
                f"(ledger: {self.path})")
        return after

    def record(self, server_round: int, plan: DPPlan, steps: int | None = None, *,
               ran: list | tuple | None = None) -> float:
        """Add a trained round, save the file, return the epsilon spent so far.

        ``ran`` is ``(noise_multiplier, sample_rate, steps)`` of the steps that actually
        ran (:meth:`fedface.privacy.PrivateTraining.accounted`): what is accounted is
        what ran, not what was planned. Without it, ``steps`` steps of the plan.
        """
        self.bind(plan)
        if ran is None:
            ran = (plan.noise_multiplier, plan.sample_rate,
                   plan.steps_per_round if steps is None else steps)
        sigma, q, n = float(ran[0]), float(ran[1]), int(ran[2])
        self.history.append([sigma, q, n])
        eps = self.spent
        self.rounds.append({"round": int(server_round), "steps": n, "sample_rate": q,
                            "noise_multiplier": sigma, "epsilon": round(eps, 6)})
        self.save()
        return eps

    def save(self) -> None:
        """Write the file atomically (no-op for an in-memory ledger, ``path=""``)."""
        if not self.path:
            return
        atomic_write_text(self.path, self.to_json())


def plan_for_run(cfg, images: int, people: int, client: str = "this client") -> DPPlan:
    """A client of ``images`` training images of ``people`` people: its plan from a
    :class:`fedface.config.RunConfig`'s ``dp_*`` settings (``dp_unit`` picks the unit)."""
    person = cfg.dp_unit == "person"
    return plan_dp(people if person else images, epsilon=cfg.dp_epsilon, delta=cfg.dp_delta,
                   rounds=cfg.dp_rounds or cfg.rounds, local_epochs=cfg.local_epochs,
                   batch_size=cfg.batch_size, max_grad_norm=cfg.dp_clip,
                   accountant=cfg.dp_accountant, max_noise_multiplier=cfg.dp_max_noise,
                   client=client, unit=cfg.dp_unit,
                   images_per_unit=cfg.dp_person_images if person else 1)


def check_run(cfg, client_sizes: dict[int, tuple[int, int]]) -> dict[int, DPPlan]:
    """Plan every client of a run (``{client: (images, people)}``) before any training;
    the first impossible plan is refused with its client named. Returns ``{client: plan}``."""
    return {cid: plan_for_run(cfg, n, p, f"client {cid}")
            for cid, (n, p) in sorted(client_sizes.items())}
