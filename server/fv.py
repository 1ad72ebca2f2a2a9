"""Federated validation (FV): choose each round's client weighting by validation score.

After a round's replies are screened, FV aggregates them under several candidate
weightings, sends every candidate to the clients in the round's evaluate exchange
(``fv-0``, ``fv-1``, ... next to the usual ``arrays``), and keeps the candidate with the
best sample-weighted validation accuracy on the clients' private validation identities.
Only scalar scores leave the clients.

Candidates are a softmax-temperature family over the clients' sample counts,
``w_k ~ exp(tau * log n_k) = n_k ** tau``: ``tau = 1`` is sample-count weighting (FedAvg),
``tau = 0`` uniform, and the search keeps the last chosen ``tau`` and tries its
neighbours ``tau +/- step``, so the weighting can drift towards what validates best.
The number of candidates per round (the budget) bounds the extra evaluation bytes.

Without FV the round loop runs :class:`SingleCandidate`: the strategy's own aggregate is
the one candidate, so the loop has one path.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message
from flwr.serverapp.strategy import Strategy

from fedface.protocol import METRICS, NUM_EXAMPLES, score_key, weighted_metric


class SingleCandidate:
    """No federated validation: one candidate, the strategy's own aggregate (no copy)."""

    def aggregate_candidates(self, strategy: Strategy, server_round: int,
                             replies: list[Message]) -> list[dict]:
        arrays, _ = strategy.aggregate_train(server_round, replies)
        return [{"arrays": arrays, "strategy": strategy}]

    @staticmethod
    def scores(eval_replies: list[Message], n_candidates: int) -> list[float | None]:
        return [weighted_metric(eval_replies, score_key(0))]

    def choose(self, scores: list[float | None]) -> int:
        return 0

    def chosen(self, candidate: dict) -> None:
        """Nothing to learn from the choice."""

    def round_record(self, candidates: list[dict], scores: list, best: int) -> dict:
        return {}

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        """Nothing kept."""


@dataclass
class FederatedValidation:
    """Candidate weightings and the search state.

    Parameters
    ----------
    budget : int (default: 4)
        Candidates scored per round (at least 2: sample count and uniform).
    step : float (default: 0.5)
        Temperature step of the search around the last chosen temperature.
    """

    budget: int = 4
    step: float = 0.5
    tau: float = 1.0
    history: list[float] = field(default_factory=list)

    def candidates(self) -> list[tuple[str, float]]:
        """(name, tau) pairs for this round, sample count and uniform first."""
        taus = [1.0, 0.0, self.tau, self.tau - self.step, self.tau + self.step]
        out: list[tuple[str, float]] = []
        for t in taus:
            t = round(float(np.clip(t, -1.0, 3.0)), 4)
            if all(abs(t - o) > 1e-9 for _, o in out):
                name = "samples" if t == 1.0 else "uniform" if t == 0.0 else f"tau={t:g}"
                out.append((name, t))
        return out[: max(2, self.budget)]

    @staticmethod
    def weights(replies: list[Message], tau: float, counts=None) -> np.ndarray:
        """Weights ``n^tau`` normalised, from ``counts`` (default: the replies' sample
        counts)."""
        n = np.array([float(m.content[METRICS][NUM_EXAMPLES]) for m in replies]
                     if counts is None else counts, dtype=float)
        w = np.exp(tau * np.log(n))
        return w / w.sum()

    def aggregate_candidates(self, strategy: Strategy, server_round: int,
                             replies: list[Message]):
        """Aggregate under every candidate weighting, each with its own strategy copy.

        Stateful strategies (momentum, Adam moments) update their state while
        aggregating, so every candidate runs on a copy; the chosen copy becomes the
        strategy of the next round.
        """
        originals = [m.content[METRICS][NUM_EXAMPLES] for m in replies]
        out = []
        try:
            for name, tau in self.candidates():
                # From the original counts: the loop overwrites num-examples per candidate.
                w = self.weights(replies, tau, originals)
                for m, wi in zip(replies, w):
                    m.content[METRICS][NUM_EXAMPLES] = float(wi)
                s = copy.deepcopy(strategy)
                arrays, _ = s.aggregate_train(server_round, replies)
                out.append({"name": name, "tau": tau, "weights": w, "arrays": arrays,
                            "strategy": s})
        finally:
            for m, n in zip(replies, originals):
                m.content[METRICS][NUM_EXAMPLES] = n
        return out

    @staticmethod
    def scores(eval_replies: list[Message], n_candidates: int) -> list[float | None]:
        """Sample-weighted validation accuracy of each candidate (index 0 = ``arrays``)."""
        return [weighted_metric(eval_replies, score_key(i)) for i in range(n_candidates)]

    def choose(self, scores: list[float | None]) -> int:
        """Index of the best candidate (ties and missing scores favour sample count)."""
        best, best_score = 0, -1.0
        for i, s in enumerate(scores):
            if s is not None and s > best_score + 1e-12:
                best, best_score = i, s
        return best

    def chosen(self, candidate: dict) -> None:
        """The search goes on around the chosen candidate's temperature."""
        self.tau = candidate["tau"]
        self.history.append(candidate["tau"])

    @staticmethod
    def round_record(candidates: list[dict], scores: list, best: int) -> dict:
        """The round's ``fv`` record: every candidate's weights and score, the choice."""
        return {"fv": {"candidates": [
            {"name": c["name"], "tau": c["tau"], "score": s,
             "weights": [round(float(w), 4) for w in c["weights"]]}
            for c, s in zip(candidates, scores)], "chosen": candidates[best]["name"]}}

    def state(self) -> dict:
        return {"tau": self.tau, "history": list(self.history)}

    def load_state(self, state: dict) -> None:
        self.tau = float(state["tau"])
        self.history = [float(t) for t in state["history"]]
