"""The round lifecycle every strategy fedface builds goes through.

:func:`server.loop.run_federated` drives Flower's ``Strategy`` calls and, around them,
the hooks of :class:`Lifecycle`::

    join (a resumed run: load_state_dict, then rejoin)
    for every round:
        catch_up -> instruct -> configure_train -> screen -> settle -> aggregate_train
        -> global_arrays -> configure_evaluate -> commit -> round_record -> checkpoint
    release

The defaults are those of a plaintext strategy (Flower's FedAvg, FedAvgM, FedAdam,
FedProx, fedface's PFM and the server-side DP wrappers, :mod:`server.strategies`): the
server holds the global model, so it screens the replies against it, tests it on its
own pairs every round and checkpoints it with the strategy's state; joining, catching
up, committing and releasing have nothing to do. :class:`server.encrypted.EncryptedFedAvg`
overrides them: it never holds a plaintext model before the release, and checkpoints
only its own state (ciphertexts and metadata); a resumed encrypted run rejoins its
institutions, which restore their own saved state.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedface.protocol import TrainInstructions, numpy_record, record_numpy
from server.screening import Screening, screen_replies


class RoundHost(Protocol):
    """What the round loop offers the hooks that use the plaintext global model."""

    def test(self, server_round: int, arrays: ArrayRecord) -> dict:
        """The round's test figures on the server's own pairs (``{}`` between them)."""

    def checkpoint(self, server_round: int, arrays: ArrayRecord, strategy_state: dict) -> None:
        """Write the run's checkpoint after ``server_round``."""


class Lifecycle:
    """Round hooks of a plaintext strategy (a mixin in front of a Flower ``Strategy``).

    ``max_update_ratio`` bounds an update's norm per step against the round's median
    (screening); :func:`server.strategies.build_strategy` sets it from the run config.
    ``private_updates`` (server-side central DP): the updates are the private inputs of
    the server's mechanism, so no median-relative screening (one client's presence would
    decide whether another is aggregated, beyond the calibrated sensitivity), no
    per-client norm in the record, and every reply must carry unit weight 1.
    """

    max_update_ratio: float = 10.0
    private_updates: bool = False

    def join(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float
             ) -> dict:
        """Start the run with the nodes; returns run metadata for ``metrics.json``."""
        return {}

    def rejoin(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float
               ) -> dict:
        """Continue a resumed run with the nodes, after :meth:`load_state_dict`; returns
        run metadata for ``metrics.json``. A plaintext strategy joins as at the start."""
        return self.join(grid, arrays, config, timeout)

    def instruct(self, ins: TrainInstructions) -> TrainInstructions:
        """The round's instructions with what this strategy asks of the clients."""
        return ins

    def catch_up(self, grid: Grid, timeout: float) -> None:
        """Bring nodes that missed an exchange back in step (before the round)."""

    def screen(self, replies: list[Message], server_round: int, reference: ArrayRecord
               ) -> Screening:
        """Split the round's replies into aggregatable and excluded ones (with reasons),
        checked against the global model ``reference``."""
        if not self.private_updates:
            return screen_replies(replies, record_numpy(reference),
                                  max_ratio=self.max_update_ratio)
        out = screen_replies(replies, record_numpy(reference), max_ratio=float("inf"),
                             unit_weight=True)
        out.update_norms = {}
        return out

    def settle(self, grid: Grid, server_round: int, good: list[Message], timeout: float
               ) -> list[Message]:
        """After screening, before aggregating: whatever the replies ``good`` need to be
        summed (masked updates: their masks that do not cancel); returns those to sum.
        May raise :class:`server.masking.RoundAborted`: the round's exchange runs again."""
        return good

    def global_arrays(self, aggregate: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
        """The global model after aggregating: the aggregate in the dtypes of the model
        ``reference`` (Flower's adaptive strategies return float64)."""
        return numpy_record({k: np.asarray(a.numpy(), dtype=np.dtype(reference[k].dtype))
                             for k, a in aggregate.items()})

    def commit(self, server_round: int, index: int, arrays: ArrayRecord,
               missed: set[int]) -> None:
        """The round's model is settled: candidate ``index`` (FV) is ``arrays``; the
        nodes in ``missed`` missed one of its exchanges."""

    def round_record(self, host: RoundHost, server_round: int, arrays: ArrayRecord,
                     good: list[Message]) -> dict:
        """What the round adds to its record: the global model's test figures."""
        return host.test(server_round, arrays)

    def checkpoint(self, host: RoundHost, server_round: int, arrays: ArrayRecord) -> None:
        """Checkpoint the global model and this strategy's state."""
        host.checkpoint(server_round, arrays, self.state_dict())

    def release(self, grid: Grid, arrays: ArrayRecord, timeout: float
                ) -> tuple[ArrayRecord, dict]:
        """The final model and run metadata for ``metrics.json``: the server holds it."""
        return arrays, {}

    def momentum_norm(self) -> float | None:
        """Norm of the server-side momentum, for strategies that keep one."""
        return None

    def state_dict(self) -> dict:
        """What the strategy has learnt (numpy arrays, floats): none here."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        check_state(self, state, ())


def check_state(strategy, state: dict, names) -> None:
    """Refuse state this strategy does not keep (a checkpoint of another strategy)."""
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise ValueError(f"The checkpoint holds strategy state {unknown} that "
                         f"{type(strategy).__name__} does not keep: it was written by "
                         "another strategy; resume with the run's own settings")
