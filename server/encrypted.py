"""Encrypted aggregation: a Flower strategy that adds ciphertexts and never sees an update.

:class:`EncryptedFedAvg` replaces FedAvg's averaging with the sum of the clients'
encrypted updates (:func:`crypto.update.add_updates`). The clients hold the global model
and the secret key; the protocol per run:

1. **Join** (a ``query`` message to every node): the public initial backbone and the
   run id go out; each institution checks that it holds the server's key fingerprint and
   replies its sample count, from which the server takes the weight reference
   ``he-weight-ref`` (the largest count).
2. **Train** (round r): clients train from their copy of the global model, pre-scale
   their update by their weight ``n_k / he-weight-ref`` (1 under central DP), encrypt
   and reply an update envelope in ``arrays``. No model travels down.
3. **Aggregate**: the server verifies each envelope (tag, key, round, run) and adds
   them, multiplying by plaintext integers only when FV asks for another weighting;
   the result is an aggregate envelope with plaintext metadata (the sums of the
   multipliers and weights, the round's learning rate and steps).
4. **Evaluate** (every node): the aggregate (and FV's candidates) go out; clients
   decrypt, form the candidate models, score them and keep them pending; the next
   message names the candidate to commit (``he-commit-round``, ``he-commit-index``), and
   under PFM every client derives the global momentum from it, identically. An
   institution that missed an exchange (no reply, or ``out of sync``) is sent the
   committed aggregates of the rounds it missed before the next round (the last
   ``keep_rounds`` are kept) and applies them in order: bit for bit the same model.
5. **Release** (a ``query`` at the end): one institution returns the final model in
   plaintext: the only plaintext the server receives, and what DP protects.

Dropouts need nothing special: the sum is over whichever clients replied, and the
weights that divide it are plaintext metadata of exactly those clients.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from crypto.envelope import EnvelopeError, from_record, to_record
from crypto.keys import ServerKeys
from crypto.update import Quantization, add_updates, open_update
from fedface.protocol import (
    ARRAYS,
    CONFIG,
    HE_CATCH_UP,
    HE_COMMIT_INDEX,
    HE_COMMIT_ROUND,
    HE_FINGERPRINT,
    HE_JOIN,
    HE_RELEASE,
    HE_ROUND_PREFIX,
    HE_RUN,
    HE_SCALE,
    HE_WEIGHT_REF,
    METRICS,
    NUM_EXAMPLES,
    error_reason,
    weighted_metric,
)
from server.validation import Screening


class EncryptedFedAvg(FedAvg):
    """FedAvg (and PFM, FedProx) over homomorphically encrypted updates.

    Parameters
    ----------
    keys : ServerKeys
        The server bundle: BFV parameters and MAC keys, no secret key.
    quantization : Quantization
        The packing settings clients use (bits, clip, headroom).
    pfm_beta : float (default: 0.0)
        PFM's momentum coefficient; clients apply the momentum (0: FedAvg).
    proximal_mu : float (default: 0.0)
        FedProx's proximal weight, sent to clients.
    keep_rounds : int (default: 8)
        Committed aggregates kept for institutions that missed rounds (catch-up).
    **kwargs
        FedAvg's sampling and key options (``weighted_by_key`` picks sample counts or
        uniform weights).
    """

    def __init__(self, keys: ServerKeys, quantization: Quantization, pfm_beta: float = 0.0,
                 proximal_mu: float = 0.0, keep_rounds: int = 8, **kwargs) -> None:
        super().__init__(**kwargs)
        self.keys = keys
        self.quantization = quantization
        self.pfm_beta = float(pfm_beta)
        self.proximal_mu = float(proximal_mu)
        self.run_id = secrets.token_hex(8)
        self.weight_ref = 0
        self.commit = (0, 0)  # (round, candidate) every client must hold before the next step
        self.round_lr = 0.0
        self.keep_rounds = int(keep_rounds)
        self.history: dict[int, ArrayRecord] = {}  # committed aggregate of each recent round
        self.lagging: set[int] = set()  # nodes that missed an exchange
        self.members: set[int] = set()  # nodes that joined the run
        # Envelopes verified by screen(), by record: aggregate_train (once per FV
        # candidate) does not hash and check them again.
        self._verified: dict[int, tuple[int, ArrayRecord, object]] = {}

    def __deepcopy__(self, memo) -> EncryptedFedAvg:
        """FV aggregates each candidate on a copy: share the keys, the kept aggregates and
        the verified envelopes (none of which aggregation changes) instead of copying
        ciphertexts."""
        clone = copy.copy(self)
        clone.history = dict(self.history)
        clone.lagging, clone.members = set(self.lagging), set(self.members)
        return clone

    # ----------------------------------------------------------------- messages
    def he_config(self, config: ConfigRecord) -> ConfigRecord:
        """The round's config plus what clients need to stay in step."""
        config[HE_RUN] = self.run_id
        config[HE_FINGERPRINT] = self.keys.fingerprint
        config[HE_WEIGHT_REF] = int(self.weight_ref)
        config[HE_COMMIT_ROUND], config[HE_COMMIT_INDEX] = self.commit
        config["pfm-beta"] = self.pfm_beta
        config["proximal-mu"] = self.proximal_mu
        return config

    def _query(self, grid: Grid, nodes: list[int], content: RecordDict, timeout: float
               ) -> list[Message]:
        msgs = [grid.create_message(content=content, message_type=MessageType.QUERY,
                                    dst_node_id=n, group_id="he") for n in nodes]
        return list(grid.send_and_receive(msgs, timeout=timeout))

    def join(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> dict:
        """Send the public initial model; check every node's key; agree on weights."""
        nodes = sorted(grid.get_node_ids())
        config = self.he_config(config)
        config[HE_JOIN] = True
        replies = self._query(grid, nodes, RecordDict({ARRAYS: arrays, CONFIG: config}), timeout)
        excluded, counts = [], []
        for m in replies:
            if m.has_error():
                excluded.append({"node": int(m.metadata.src_node_id), "reason": error_reason(m)})
            else:
                counts.append(int(m.content[METRICS][NUM_EXAMPLES]))
                self.members.add(int(m.metadata.src_node_id))
        answered = {int(m.metadata.src_node_id) for m in replies}
        excluded += [{"node": n, "reason": "no reply to the join before the round timeout"}
                     for n in nodes if n not in answered]
        if len(counts) < min(self.min_train_nodes, len(nodes)) or not counts:
            reasons = "; ".join(f"node {e['node']}: {e['reason'][:200]}" for e in excluded[:5])
            raise RuntimeError(f"Encrypted run cannot start: {len(counts)} of {len(nodes)} "
                               f"institutions joined, min-train-nodes={self.min_train_nodes}. "
                               f"{reasons}")
        self.weight_ref = max(counts) if self.weighted_by_key == NUM_EXAMPLES else 0
        return {"nodes": len(nodes), "joined": len(counts), "join_excluded": excluded,
                "weight_ref": self.weight_ref, "fingerprint": self.keys.fingerprint,
                "generation": self.keys.generation}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Ask sampled clients to train from their copy of the global model (no arrays sent)."""
        self.round_lr = float(config["lr"])
        return super().configure_train(server_round, ArrayRecord(), self.he_config(config), grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Send the aggregate envelope (``arrays``) to every client to decrypt and score."""
        return super().configure_evaluate(server_round, arrays, self.he_config(config), grid)

    # ----------------------------------------------------------------- screening
    def screen(self, replies: list[Message], server_round: int) -> Screening:
        """Keep replies whose update envelope verifies; the others with the reason."""
        out = Screening()
        self._verified = {}
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                out.excluded.append({"node": node, "reason": f"client error: {error_reason(msg)}"})
                continue
            try:
                if ARRAYS not in msg.content.array_records or METRICS not in msg.content.metric_records:
                    raise EnvelopeError("reply lacks its update envelope or metrics")
                record = msg.content[ARRAYS]
                env = open_update(self.keys, record, run=self.run_id, server_round=server_round)
                self._verified[id(record)] = (server_round, record, env)
            except EnvelopeError as err:
                out.excluded.append({"node": node, "reason": f"rejected envelope: {err}"})
                continue
            out.good.append(msg)
        return out

    # ----------------------------------------------------------------- aggregation
    def multipliers(self, replies: list[Message]) -> list[int]:
        """Integer multipliers that turn the clients' own pre-scaling into the weights asked.

        Client k pre-scaled its update by ``s_k``; the weighting asked is ``w_k`` (its
        ``weighted_by_key`` metric, which FV replaces per candidate). Equal ratios
        ``w_k / s_k`` need no multiplication; otherwise they are rounded to integers in
        ``1 .. max_multiplier``.
        """
        ratios = []
        for m in replies:
            w = float(m.content[METRICS][self.weighted_by_key])
            s = float(m.content[METRICS].get(HE_SCALE, 1.0))
            ratios.append(w / s)
        r = np.asarray(ratios)
        if np.allclose(r, r.max(), rtol=1e-6):
            return [1] * len(replies)
        top = self.quantization.max_multiplier
        return [int(x) for x in np.maximum(1, np.rint(top * r / r.max()))]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the verified update envelopes; returns the aggregate envelope record."""
        replies = list(replies)
        if not replies:
            return None, None
        updates = [self._opened(m.content[ARRAYS], server_round) for m in replies]
        steps = weighted_metric(replies, "train-steps", self.weighted_by_key) or 1.0
        env = add_updates(self.keys, updates, self.multipliers(replies), run=self.run_id,
                          server_round=server_round,
                          max_units=self.quantization.max_clients * self.quantization.max_multiplier,
                          meta={"lr": self.round_lr, "steps": float(steps),
                                "pfm_beta": self.pfm_beta})
        metrics = MetricRecord({"he-clients": len(updates),
                                "he-bytes": int(sum(len(c) for c in env.chunks))})
        return to_record(env), metrics

    def committed(self, server_round: int, index: int, aggregate: ArrayRecord) -> None:
        """Record the candidate clients commit for ``server_round`` (kept for catch-up)."""
        self.commit = (server_round, index)
        self.history[server_round] = aggregate
        for r in sorted(self.history)[:-self.keep_rounds]:
            del self.history[r]

    def missed(self, nodes: set[int]) -> None:
        """Nodes that missed an exchange; members among them catch up next round."""
        self.lagging |= set(nodes) & self.members

    def catch_up(self, grid: Grid, timeout: float) -> list[dict]:
        """Send the lagging nodes the committed aggregates they missed; who caught up."""
        if not self.lagging or not self.history:
            return []
        content = RecordDict({CONFIG: self.he_config(ConfigRecord({HE_CATCH_UP: True}))})
        for r, record in self.history.items():
            content[f"{HE_ROUND_PREFIX}{r:05d}"] = record
        events = []
        for node in sorted(self.lagging):
            reply = self._query(grid, [node], content, timeout)
            if reply and not reply[0].has_error():
                self.lagging.discard(node)
                events.append({"node": node, "caught_up_to": int(reply[0].content[METRICS]["he-round"])})
            else:
                events.append({"node": node, "reason": error_reason(reply[0]) if reply
                               else "no reply"})
        return events

    def _opened(self, record: ArrayRecord, server_round: int):
        """The verified envelope of ``record`` (verified now unless screen() did)."""
        hit = self._verified.get(id(record))
        if hit is not None and hit[0] == server_round and hit[1] is record:
            return hit[2]
        return open_update(self.keys, record, run=self.run_id, server_round=server_round)

    def release(self, grid: Grid, timeout: float) -> tuple[ArrayRecord, int]:
        """The final model in plaintext from the first institution that returns it."""
        config = self.he_config(ConfigRecord({HE_RELEASE: True}))
        problems = []
        for node in sorted(grid.get_node_ids()):
            reply = self._query(grid, [node], RecordDict({CONFIG: config}), timeout)
            if reply and not reply[0].has_error() and ARRAYS in reply[0].content.array_records:
                return reply[0].content[ARRAYS], node
            problems.append(f"node {node}: {error_reason(reply[0]) if reply else 'no reply'}")
        raise RuntimeError("No institution released the final model: " + "; ".join(problems[:5]))


def aggregate_meta(record: ArrayRecord) -> dict:
    """Plaintext metadata of an aggregate envelope (weights, multipliers, senders)."""
    return from_record(record).meta
