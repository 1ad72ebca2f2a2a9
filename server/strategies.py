"""Aggregation strategies by name.

``build_strategy(cfg)`` returns a ``flwr.serverapp.strategy`` object configured for the
run: Flower's ``fedavg``, ``fedavgm``, ``fedadam`` and ``fedprox``, fedface's
:class:`PFM` (partially federated momentum), optionally inside one of Flower's
server-side central-DP wrappers. Each is the Flower class with fedface's round
lifecycle in front (:class:`server.lifecycle.Lifecycle`: screening, test evaluation,
checkpoints) and its learnt state saved and restored explicitly (``state_dict`` /
``load_state_dict``). Federated validation (``--fv``) works on top of any of them (see
:mod:`server.fv`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Strategy

from fedface import momentum as pfm
from fedface.config import RunConfig
from fedface.privacy import sampled_clients
from fedface.protocol import (
    ARRAYS,
    CONFIG,
    MOMENTUM,
    NUM_EXAMPLES,
    TRAIN_STEPS,
    UNIT_WEIGHT,
    TrainInstructions,
    numpy_record,
    record_numpy,
    weighted_metric,
)
from server.lifecycle import Lifecycle, check_state


def _arrays(value) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in value.items()}


class FedAvg(Lifecycle, flwr_strategy.FedAvg):
    """Flower's FedAvg (no state of its own)."""


class FedProx(Lifecycle, flwr_strategy.FedProx):
    """Flower's FedProx: asks clients for the proximal term."""

    def instruct(self, ins: TrainInstructions) -> TrainInstructions:
        return dataclasses.replace(ins, proximal_mu=self.proximal_mu)


class FedAvgM(Lifecycle, flwr_strategy.FedAvgM):
    """Flower's FedAvgM. State: its own copy of the global model (kept in the dtypes its
    step produced) and the server momentum."""

    def momentum_norm(self) -> float | None:
        vec = self.momentum_vector
        return None if vec is None else pfm.norm(dict(enumerate(vec)))

    def state_dict(self) -> dict:
        state = {}
        if self.current_arrays is not None:
            state["current_arrays"] = record_numpy(self.current_arrays)
        if self.momentum_vector is not None:
            state["momentum_vector"] = list(self.momentum_vector)
        return state

    def load_state_dict(self, state: dict) -> None:
        check_state(self, state, ("current_arrays", "momentum_vector"))
        arrays, vec = state.get("current_arrays"), state.get("momentum_vector")
        self.current_arrays = None if arrays is None else numpy_record(arrays)
        self.momentum_vector = None if vec is None else [np.asarray(v) for v in vec]


class FedAdam(Lifecycle, flwr_strategy.FedAdam):
    """Flower's FedAdam. State: the first and second moments (and the model of the
    round, which ``configure_train`` sets again)."""

    def state_dict(self) -> dict:
        return {name: dict(value) for name in ("current_arrays", "m_t", "v_t")
                if (value := getattr(self, name))}

    def load_state_dict(self, state: dict) -> None:
        check_state(self, state, ("current_arrays", "m_t", "v_t"))
        self.current_arrays, self.m_t, self.v_t = (
            _arrays(state[n]) if n in state else None for n in ("current_arrays", "m_t", "v_t"))


class PFM(Lifecycle, flwr_strategy.FedAvg):
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

    def instruct(self, ins: TrainInstructions) -> TrainInstructions:
        return dataclasses.replace(ins, pfm_beta=self.beta)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send the backbone, the round's config and the momentum."""
        self.current_arrays = record_numpy(arrays)
        self.round_lr = float(TrainInstructions.from_record(config).lr)
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
        mean = record_numpy(agg)
        # The momentum describes the clients' own steps: it is estimated from the plain
        # average, before any server step size is applied.
        steps = weighted_metric(replies, TRAIN_STEPS, self.weighted_by_key) or 1.0
        self.momentum = pfm.momentum_update(self.momentum, before, mean, self.round_lr,
                                            max(steps, 1.0), self.beta)
        after = mean
        if self.server_learning_rate != 1.0:
            after = {k: (before[k] - self.server_learning_rate * (before[k] - v)).astype(v.dtype)
                     if v.dtype.kind == "f" else v for k, v in mean.items()}
        return numpy_record(after), metrics

    def momentum_norm(self) -> float | None:
        return None if self.momentum is None else pfm.norm(self.momentum)

    def state_dict(self) -> dict:
        state = {name: dict(value) for name in ("momentum", "current_arrays")
                 if (value := getattr(self, name))}
        return {**state, "round_lr": self.round_lr}

    def load_state_dict(self, state: dict) -> None:
        check_state(self, state, ("momentum", "current_arrays", "round_lr"))
        self.momentum, self.current_arrays = (
            _arrays(state[n]) if n in state else None for n in ("momentum", "current_arrays"))
        self.round_lr = float(state.get("round_lr", 0.0))


class _ServerSideDP(Lifecycle):
    """Flower's server-side central-DP wrappers: the inner strategy's asks, momentum and
    state, with the wrapper's own (its model of the round and its clip, which adaptive
    clipping moves)."""

    def instruct(self, ins: TrainInstructions) -> TrainInstructions:
        return self.strategy.instruct(ins)

    def momentum_norm(self) -> float | None:
        return self.strategy.momentum_norm()

    def state_dict(self) -> dict:
        return {"strategy": self.strategy.state_dict(),
                "current_arrays": record_numpy(self.current_arrays),
                "clipping_norm": float(self.clipping_norm)}

    def load_state_dict(self, state: dict) -> None:
        check_state(self, state, ("strategy", "current_arrays", "clipping_norm"))
        self.strategy.load_state_dict(state.get("strategy", {}))
        self.current_arrays = numpy_record(state.get("current_arrays", {}))
        self.clipping_norm = float(state.get("clipping_norm", self.clipping_norm))


class ServerSideFixedClipping(_ServerSideDP,
                              flwr_strategy.DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping around a fedface strategy."""


class ServerSideAdaptiveClipping(_ServerSideDP,
                                 flwr_strategy.DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping around a fedface strategy."""


def _common(cfg: RunConfig) -> dict:
    n = cfg.num_clients
    # Central DP bounds each client's influence on an unweighted mean: uniform weights.
    weights = UNIT_WEIGHT if cfg.central_dp != "off" else NUM_EXAMPLES
    return dict(fraction_train=cfg.fraction_train, fraction_evaluate=1.0,
                min_train_nodes=min(cfg.min_train_nodes, n),
                min_evaluate_nodes=min(cfg.min_train_nodes, n), min_available_nodes=n,
                weighted_by_key=weights, arrayrecord_key=ARRAYS, configrecord_key=CONFIG)


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
        strategy = ServerSideFixedClipping(
            strategy, noise_multiplier=cfg.central_dp_noise, clipping_norm=cfg.central_dp_clip,
            num_sampled_clients=m)
    elif cfg.central_dp == "server-adaptive":
        # The clipped-count's noise must exceed half the multiplier for the pair (count,
        # model) to compose to it (Andrew et al. 2021); Flower's default m/20 does not
        # for small federations (8 clients at noise 1 was refused).
        strategy = ServerSideAdaptiveClipping(
            strategy, noise_multiplier=cfg.central_dp_noise, num_sampled_clients=m,
            initial_clipping_norm=cfg.central_dp_clip,
            clipped_count_stddev=max(m / 20, cfg.central_dp_noise))
    strategy.max_update_ratio = cfg.max_update_ratio
    strategy.private_updates = cfg.central_dp.startswith("server-")
    return strategy


def encrypted_strategy(cfg: RunConfig) -> Strategy:
    """FedAvg, PFM or FedProx over encrypted updates (keys: the ceremony's server bundle)."""
    from crypto.keys import load_server_keys
    from crypto.masks import MaskSettings
    from crypto.update import Quantization
    from server.encrypted import EncryptedFedAvg

    masks = (MaskSettings(degree=cfg.he_mask_degree, threshold=cfg.he_mask_threshold)
             if cfg.he_masks else None)
    return EncryptedFedAvg(
        load_server_keys(cfg.he_keys), Quantization.from_config(cfg),
        pfm_beta=cfg.pfm_beta if cfg.strategy == "pfm" else 0.0,
        proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0, masks=masks,
        **_common(cfg))
