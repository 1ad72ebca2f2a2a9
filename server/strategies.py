"""Aggregation strategies by name.

``build_strategy(cfg)`` returns a Flower ``flwr.serverapp.strategy`` object configured
for the run; later strategies (PFM, encrypted aggregation) register here too.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import FedAvg, Strategy

from fedface.config import RunConfig
from fedface.protocol import ARRAYS, CONFIG, NUM_EXAMPLES


def _fedavg(cfg: RunConfig) -> Strategy:
    n = cfg.num_clients
    return FedAvg(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=min(cfg.min_train_nodes, n),
        min_evaluate_nodes=min(cfg.min_train_nodes, n),
        min_available_nodes=n,
        weighted_by_key=NUM_EXAMPLES,
        arrayrecord_key=ARRAYS,
        configrecord_key=CONFIG,
    )


STRATEGIES: dict[str, Callable[[RunConfig], Strategy]] = {"fedavg": _fedavg}


def build_strategy(cfg: RunConfig) -> Strategy:
    """The strategy named by ``cfg.strategy``; an unknown name lists the known ones."""
    try:
        factory = STRATEGIES[cfg.strategy]
    except KeyError:
        raise ValueError(
            f"Unknown strategy {cfg.strategy!r}; available: {sorted(STRATEGIES)}"
        ) from None
    return factory(cfg)
