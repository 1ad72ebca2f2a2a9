"""Aggregation strategies by name.

``build_strategy(cfg)`` returns a ``flwr.serverapp.strategy`` object configured for the
run: Flower's ``fedavg``, ``fedavgm``, ``fedadam`` and ``fedprox``, and fedface's
:class:`PFM` (partially federated momentum). Federated validation (``--fv``) works on
top of any of them (see :mod:`server.fv`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    Strategy,
)

from fedface import momentum as pfm
from fedface.config import RunConfig
from fedface.protocol import (
    ARRAYS,
    CONFIG,
    MOMENTUM,
    NUM_EXAMPLES,
    UNIT_WEIGHT,
    numpy_record,
    weighted_metric,
)


class PFM(FedAvg):
    """Partially federated momentum (Bai et al., arXiv 2105.02501; our reading).

    The server keeps the equivalent global momentum over the federated backbone only,
    estimated from each round's aggregate with :func:`fedface.momentum.momentum_update`;
    clients receive it with the backbone and start their backbone's momentum buffer from
    it, so every local step applies it (heads keep ordinary local momentum). Aggregation
    itself is sample-weighted averaging (FedAvg).

    Parameters
    ----------
    beta : float (default: 0.9)
        Momentum coefficient of the backbone's local steps and of the estimate; 0
        turns PFM off (clients train as under FedAvg).
    server_learning_rate : float (default: 1.0)
        Step along the aggregated update: ``w <- w - lr_s * (w - w_avg)``.
    **kwargs
        FedAvg's sampling and key options.
    """

    def __init__(self, beta: float = 0.9, server_learning_rate: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"PFM beta={beta} must be in [0, 1)")
        self.beta = float(beta)
        self.server_learning_rate = float(server_learning_rate)
        self.momentum: dict[str, np.ndarray] | None = None
        self.current_arrays: dict[str, np.ndarray] | None = None
        self.round_lr: float = 0.0

    def summary(self) -> None:
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send the backbone, the round's config with ``pfm-beta``, and the momentum."""
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        self.round_lr = float(config["lr"])
        config["pfm-beta"] = self.beta
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.momentum:
            record = numpy_record(self.momentum)
            for msg in messages:
                msg.content[MOMENTUM] = record
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the replies, step the global model, update the momentum."""
        replies = list(replies)
        agg, metrics = super().aggregate_train(server_round, replies)
        if agg is None or self.current_arrays is None:
            return agg, metrics
        before = self.current_arrays
        mean = {k: a.numpy() for k, a in agg.items()}
        # The momentum describes the clients' own steps: it is estimated from the plain
        # average, before any server step size is applied.
        steps = weighted_metric(replies, "train-steps", self.weighted_by_key) or 1.0
        self.momentum = pfm.momentum_update(self.momentum, before, mean, self.round_lr,
                                            max(steps, 1.0), self.beta)
        after = mean
        if self.server_learning_rate != 1.0:
            after = {k: (before[k] - self.server_learning_rate * (before[k] - v)).astype(v.dtype)
                     if v.dtype.kind == "f" else v for k, v in mean.items()}
        return numpy_record(after), metrics


def _common(cfg: RunConfig) -> dict:
    n = cfg.num_clients
    # Central DP bounds each client's influence on an unweighted mean: uniform weights.
    weights = UNIT_WEIGHT if cfg.central_dp != "off" else NUM_EXAMPLES
    return dict(fraction_train=cfg.fraction_train, fraction_evaluate=1.0,
                min_train_nodes=min(cfg.min_train_nodes, n),
                min_evaluate_nodes=min(cfg.min_train_nodes, n), min_available_nodes=n,
                weighted_by_key=weights, arrayrecord_key=ARRAYS, configrecord_key=CONFIG)


def sampled_clients(cfg: RunConfig) -> int:
    """Clients asked to train each round (Flower's FedAvg sampling rule)."""
    n = cfg.num_clients
    return min(n, max(int(n * cfg.fraction_train), min(cfg.min_train_nodes, n)))


STRATEGIES: dict[str, Callable[[RunConfig], Strategy]] = {
    "fedavg": lambda cfg: FedAvg(**_common(cfg)),
    "fedavgm": lambda cfg: FedAvgM(**_common(cfg), server_learning_rate=cfg.server_lr,
                                   server_momentum=cfg.server_momentum),
    "fedadam": lambda cfg: FedAdam(**_common(cfg), eta=cfg.fedadam_eta, tau=cfg.fedadam_tau),
    "fedprox": lambda cfg: FedProx(**_common(cfg), proximal_mu=cfg.proximal_mu),
    "pfm": lambda cfg: PFM(beta=cfg.pfm_beta, server_learning_rate=cfg.server_lr, **_common(cfg)),
}


def build_strategy(cfg: RunConfig) -> Strategy:
    """The strategy named by ``cfg.strategy``; an unknown name lists the known ones."""
    try:
        factory = STRATEGIES[cfg.strategy]
    except KeyError:
        raise ValueError(
            f"Unknown strategy {cfg.strategy!r}; available: {sorted(STRATEGIES)}"
        ) from None
    if cfg.encrypted:
        return encrypted_strategy(cfg)
    strategy = factory(cfg)
    m = sampled_clients(cfg)
    if cfg.central_dp == "server-fixed":
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=cfg.central_dp_noise, clipping_norm=cfg.central_dp_clip,
            num_sampled_clients=m)
    elif cfg.central_dp == "server-adaptive":
        # The clipped-count's noise must exceed half the multiplier for the pair (count,
        # model) to compose to it (Andrew et al. 2021); Flower's default m/20 does not
        # for small federations (8 clients at noise 1 was refused).
        strategy = DifferentialPrivacyServerSideAdaptiveClipping(
            strategy, noise_multiplier=cfg.central_dp_noise, num_sampled_clients=m,
            initial_clipping_norm=cfg.central_dp_clip,
            clipped_count_stddev=max(m / 20, cfg.central_dp_noise))
    return strategy


def encrypted_strategy(cfg: RunConfig) -> Strategy:
    """FedAvg, PFM or FedProx over encrypted updates (keys: the ceremony's server bundle)."""
    from crypto.keys import load_server_keys
    from crypto.update import Quantization
    from server.encrypted import EncryptedFedAvg

    return EncryptedFedAvg(
        load_server_keys(cfg.he_keys), Quantization.from_config(cfg),
        pfm_beta=cfg.pfm_beta if cfg.strategy == "pfm" else 0.0,
        proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0, **_common(cfg))


def inner_strategy(strategy: Strategy) -> Strategy:
    """The aggregation strategy inside a DP wrapper (or the strategy itself)."""
    inner = getattr(strategy, "strategy", None)
    return inner if isinstance(inner, Strategy) else strategy


# ---------------------------------------------------------------- state for checkpoints
def strategy_state(strategy: Strategy) -> dict:
    """The strategy's learned state (momenta, Adam moments, current weights) as arrays.

    Collects every attribute holding arrays: an ``ArrayRecord``, a dict of arrays or a
    list of arrays; configuration scalars are rebuilt from the run config on resume.
    """
    state = {}
    for name, value in vars(strategy).items():
        if isinstance(value, Strategy):  # a DP wrapper's inner strategy
            state[name] = {"kind": "strategy", "value": strategy_state(value)}
        elif isinstance(value, ArrayRecord):
            state[name] = {"kind": "arrayrecord", "value": {k: a.numpy() for k, a in value.items()}}
        elif isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            state[name] = {"kind": "dict", "value": dict(value)}
        elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
            state[name] = {"kind": "list", "value": list(value)}
        elif isinstance(value, float) and name in ("round_lr", "clipping_norm"):
            state[name] = {"kind": "float", "value": value}
    return state


def load_strategy_state(strategy: Strategy, state: dict) -> None:
    """Restore what :func:`strategy_state` saved."""
    for name, item in state.items():
        kind, value = item["kind"], item["value"]
        if kind == "strategy":
            load_strategy_state(getattr(strategy, name), value)
        elif kind == "arrayrecord":
            setattr(strategy, name, numpy_record(value))
        elif kind == "dict":
            setattr(strategy, name, {k: np.asarray(v) for k, v in value.items()})
        elif kind == "list":
            setattr(strategy, name, [np.asarray(v) for v in value])
        else:
            setattr(strategy, name, value)
