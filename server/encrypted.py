"""Encrypted aggregation: a Flower strategy that adds ciphertexts and never sees an update.

:class:`EncryptedFedAvg` replaces FedAvg's averaging with the sum of the clients'
encrypted updates (:func:`crypto.update.add_updates`). The clients hold the global model
and the secret key; the protocol per run:

1. **Join** (a ``query`` message to every node): the public initial backbone and the
   run id go out; each institution checks that it holds the server's key fingerprint and
   replies a join proof (:func:`crypto.update.prove_join`): its ceremony index and sample
   count under an HMAC with its own MAC key over the run, its node id, the index and the
   count. The server verifies it, binds the node to that index (two nodes proving one
   index are both refused) and takes the weight reference ``he-weight-ref`` (the largest
   proven count).
2. **Train** (round r): clients train from their copy of the global model, pre-scale
   their update by their weight ``n_k / he-weight-ref`` (1 under central DP), encrypt
   and reply an update envelope in ``arrays``; its authenticated header carries the
   scale, sample count and step count. No model travels down.
3. **Aggregate**: the server verifies each envelope (tag, key, round, run, that its
   sender is the node's bound index, and at most one per sender: a duplicate is left
   out with the reason) and adds them; the weights, multipliers and PFM's step count
   come from the verified headers, never from the plaintext metrics. The result is an
   aggregate envelope with plaintext metadata (the senders, the sums of the
   multipliers and weights, the round's learning rate and steps). An aggregate of a
   single update is refused (it is that update; institutions refuse to decrypt it).
4. **Evaluate** (every node): the aggregate goes out; clients decrypt it, score the
   new model and keep it pending; the next message names it to commit
   (``he-commit-round``, ``he-commit-index``), and under PFM every client derives the
   global momentum from it, identically. An institution that missed an exchange (no
   reply, or ``out of sync``) is sent the committed aggregates of the rounds it missed
   before the next round (the last ``keep_rounds`` are kept) and applies them in order:
   bit for bit the same model.
5. **Release** (a ``query`` at the end): one institution returns the final model in
   plaintext: the only plaintext the server receives, and what DP protects.
   Institutions release only the model of the run's last round (or, once their DP
   budget cannot pay for another round, the model the budget-stopped run ends with).

FV is refused under encryption (``RunConfig``): every candidate weighting would be
another integer combination of the same encrypted updates, decrypted by every
institution, and ``k + 1`` combinations solve for the individual updates.

Dropouts need nothing special: the sum is over whichever clients replied, and the
weights that divide it are the authenticated metadata of exactly those clients.
"""

from __future__ import annotations

import copy
import dataclasses
import secrets
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from crypto.envelope import Envelope, EnvelopeError, from_record, to_record
from crypto.keys import ServerKeys
from crypto.packing import float_keys
from crypto.update import (
    JOIN_PROOF,
    SCALE,
    TRAIN_STEPS,
    Quantization,
    add_updates,
    open_update,
    verify_join,
)
from fedface.protocol import (
    ARRAYS,
    CONFIG,
    DATA_DIR,
    HE_BYTES,
    HE_CATCH_UP,
    HE_CLIENTS,
    HE_CLIPPED,
    HE_COMMIT_INDEX,
    HE_COMMIT_ROUND,
    HE_FINGERPRINT,
    HE_JOIN,
    HE_RELEASE,
    HE_ROUND,
    HE_ROUND_PREFIX,
    HE_RUN,
    HE_WEIGHT_REF,
    METRICS,
    NODE_HE_SENDER,
    NUM_EXAMPLES,
    STATE_DIR,
    UNIT_WEIGHT,
    TrainInstructions,
    record_numpy,
)
from server.lifecycle import Lifecycle, RoundHost
from server.screening import Screening, exchange, reply_error


class EncryptedFedAvg(Lifecycle, FedAvg):
    """FedAvg (and PFM, FedProx) over homomorphically encrypted updates.

    Its round lifecycle (:class:`server.lifecycle.Lifecycle`) is the protocol above:
    :meth:`join`, :meth:`screen` (envelopes), :meth:`commit`, :meth:`catch_up` and
    :meth:`release`; the server holds no plaintext model to test or checkpoint.

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
        self.commit_point = (0, 0)  # (round, candidate) every client must hold before the next step
        self.round_lr = 0.0
        self.keep_rounds = int(keep_rounds)
        self.history: dict[int, ArrayRecord] = {}  # committed aggregate of each recent round
        self.lagging: set[int] = set()  # nodes that missed an exchange
        self.members: set[int] = set()  # nodes that joined the run
        self.bound: dict[int, int] = {}  # node -> the ceremony index it proved at join
        self.dirs: dict[str, str] = {}  # data-dir / state-dir of the join (for the release)
        self.summary: dict = {}  # run metadata: scheme, packing, keys, the join (no secrets)
        self.caught_up: list[dict] = []  # this round's catch-up events
        # Envelopes verified by screen(), by record: aggregate_train does not hash and
        # check them again.
        self._verified: dict[int, tuple[int, ArrayRecord, Envelope]] = {}

    def __deepcopy__(self, memo) -> EncryptedFedAvg:
        """A copy shares the keys (SEAL objects cannot be copied), the kept aggregates and
        the verified envelopes (none of which aggregation changes)."""
        clone = copy.copy(self)
        clone.history = dict(self.history)
        clone.lagging, clone.members = set(self.lagging), set(self.members)
        clone.bound = dict(self.bound)
        return clone

    # ----------------------------------------------------------------- messages
    def he_config(self, config: ConfigRecord) -> ConfigRecord:
        """The round's config plus what clients need to stay in step."""
        config[HE_RUN] = self.run_id
        config[HE_FINGERPRINT] = self.keys.fingerprint
        config[HE_WEIGHT_REF] = int(self.weight_ref)
        config[HE_COMMIT_ROUND], config[HE_COMMIT_INDEX] = self.commit_point
        return config

    def instruct(self, ins: TrainInstructions) -> TrainInstructions:
        """PFM's momentum coefficient and FedProx's proximal weight, for the clients."""
        return dataclasses.replace(ins, pfm_beta=self.pfm_beta, proximal_mu=self.proximal_mu)

    def _query(self, grid: Grid, nodes: list[int], content: RecordDict, timeout: float
               ) -> list[Message]:
        msgs = [grid.create_message(content=content, message_type=MessageType.QUERY,
                                    dst_node_id=n, group_id="he") for n in nodes]
        return list(exchange(grid, msgs, timeout))

    def join(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> dict:
        """Send the public initial model; check every node's key and ceremony index (the
        node is bound to it); agree on weights from the proven sample counts. Returns the
        run's ``encryption`` metadata (:meth:`summary_record`)."""
        nodes = sorted(grid.get_node_ids())
        self.dirs = {k: str(config[k]) for k in (DATA_DIR, STATE_DIR) if k in config}
        config = self.he_config(config)
        config[HE_JOIN] = True
        replies = self._query(grid, nodes, RecordDict({ARRAYS: arrays, CONFIG: config}), timeout)
        excluded, claims = [], {}
        for m in replies:
            node = int(m.metadata.src_node_id)
            if m.has_error():
                code, reason = reply_error(m)
                excluded.append({"node": node, "code": code, "reason": reason})
                continue
            try:
                proof = m.content.config_records.get(JOIN_PROOF)
                sender, count = verify_join(self.keys, proof, run=self.run_id, node=node)
            except EnvelopeError as err:
                excluded.append({"node": node, "reason": f"join refused: {err}"})
                continue
            claims.setdefault(sender, []).append((node, count))
        self.bound, self.members, counts = {}, set(), []
        for sender, claimants in sorted(claims.items()):
            if len(claimants) > 1:  # one index, one node: refuse them all, saying who
                who = ", ".join(str(n) for n, _ in claimants)
                excluded += [{"node": n, "reason": f"join refused: nodes {who} all prove ceremony "
                              f"index {sender}; each institution joins once, under its own "
                              f"{NODE_HE_SENDER}"} for n, _ in claimants]
                continue
            (node, count), = claimants
            self.bound[node] = sender
            self.members.add(node)
            counts.append(count)
        answered = {int(m.metadata.src_node_id) for m in replies}
        excluded += [{"node": n, "reason": "no reply to the join before the round timeout"}
                     for n in nodes if n not in answered]
        if len(counts) < min(self.min_train_nodes, len(nodes)) or not counts:
            reasons = "; ".join(f"node {e['node']}: {e['reason'][:200]}" for e in excluded[:5])
            raise RuntimeError(f"Encrypted run cannot start: {len(counts)} of {len(nodes)} "
                               f"institutions joined, min-train-nodes={self.min_train_nodes}. "
                               f"{reasons}")
        self.weight_ref = max(counts) if self.weighted_by_key == NUM_EXAMPLES else 0
        self.summary = self.summary_record(record_numpy(arrays), {
            "nodes": len(nodes), "joined": len(counts), "join_excluded": excluded,
            "weight_ref": self.weight_ref, "fingerprint": self.keys.fingerprint,
            "generation": self.keys.generation,
            "senders": {str(n): k for n, k in sorted(self.bound.items())}})
        return {"encryption": self.summary}

    def summary_record(self, model: dict[str, np.ndarray], joined: dict) -> dict:
        """Run metadata of encrypted aggregation: scheme, packing, keys (no secrets)."""
        params = self.keys.context.params
        layout = self.quantization.layout(sum(model[k].size for k in float_keys(model)),
                                          self.keys)
        return {**joined, "params": params.to_dict(), "layout": layout.to_dict(),
                "ciphertexts_per_update": layout.ciphertexts, "step": layout.step}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Ask sampled clients to train from their copy of the global model (no arrays sent)."""
        self.round_lr = float(TrainInstructions.from_record(config).lr)
        return super().configure_train(server_round, ArrayRecord(), self.he_config(config), grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Send the aggregate envelope (``arrays``) to every client to decrypt and score."""
        return super().configure_evaluate(server_round, arrays, self.he_config(config), grid)

    # ----------------------------------------------------------------- screening
    def screen(self, replies: list[Message], server_round: int,
               reference: ArrayRecord | None = None) -> Screening:
        """Keep replies whose update envelope verifies, comes from the sender the node
        proved at join, and is the first of its sender this round; the others are
        excluded with the reason. (There is no plaintext ``reference`` to check.)"""
        out = Screening()
        self._verified = {}
        seen: dict[int, int] = {}  # sender -> node whose envelope was kept
        for msg in out.usable(replies):
            node = int(msg.metadata.src_node_id)
            try:
                if ARRAYS not in msg.content.array_records or METRICS not in msg.content.metric_records:
                    raise EnvelopeError("reply lacks its update envelope or metrics")
                record = msg.content[ARRAYS]
                env = open_update(self.keys, record, run=self.run_id, server_round=server_round)
                sender = env.header["sender"]
                if node not in self.bound:
                    raise EnvelopeError(f"node {node} did not prove a ceremony index when the run "
                                        "started: its envelopes are refused")
                if sender != self.bound[node]:
                    raise EnvelopeError(f"node {node} carries an envelope of sender {sender}, but "
                                        f"proved index {self.bound[node]} at join: a node may only "
                                        "send its own update")
                if sender in seen:
                    raise EnvelopeError(f"duplicate envelope of sender {sender} in round "
                                        f"{server_round} (one was already accepted from node "
                                        f"{seen[sender]}): left out, the round goes on")
                seen[sender] = node
                self._verified[id(record)] = (server_round, record, env)
            except EnvelopeError as err:
                out.excluded.append({"node": node, "reason": f"rejected envelope: {err}"})
                continue
            out.good.append(msg)
        return out

    # ----------------------------------------------------------------- aggregation
    def weight_of(self, env: Envelope) -> float:
        """The weight ``w_k`` the aggregation asks of an update, from its verified header:
        its sample count, or 1 under uniform (central-DP) weighting."""
        if self.weighted_by_key == NUM_EXAMPLES:
            return float(env.meta[NUM_EXAMPLES])
        if self.weighted_by_key == UNIT_WEIGHT:
            return 1.0
        raise ValueError(f"weighted_by_key={self.weighted_by_key!r}: encrypted aggregation "
                         f"weights by {NUM_EXAMPLES!r} or {UNIT_WEIGHT!r}")

    def multipliers(self, updates: list[Envelope]) -> list[int]:
        """Integer multipliers that turn the clients' own pre-scaling into the weights asked.

        Client k pre-scaled its update by ``s_k``; the weighting asked is ``w_k``
        (:meth:`weight_of`). Both come from the update's authenticated header. Equal
        ratios ``w_k / s_k`` need no multiplication; otherwise they are rounded to
        integers in ``1 .. max_multiplier`` (1 for every run RunConfig accepts).
        """
        r = np.asarray([self.weight_of(u) / float(u.meta[SCALE]) for u in updates])
        if np.allclose(r, r.max(), rtol=1e-6):
            return [1] * len(updates)
        top = self.quantization.max_multiplier
        return [int(x) for x in np.maximum(1, np.rint(top * r / r.max()))]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the verified update envelopes; returns the aggregate envelope record.

        Weights, multipliers and PFM's step count come from the envelopes' authenticated
        headers (the plaintext metrics are reports only).
        """
        replies = list(replies)
        if not replies:
            return None, None
        if not all(self._is_verified(m.content[ARRAYS], server_round) for m in replies):
            screened = self.screen(replies, server_round)  # not screened yet: do it now
            if screened.excluded:
                raise EnvelopeError("; ".join(f"node {e['node']}: {e['reason']}"
                                              for e in screened.excluded))
        updates = [self._verified[id(m.content[ARRAYS])][2] for m in replies]
        senders = sorted({u.header["sender"] for u in updates})
        if len(senders) < 2:
            raise RuntimeError(f"Round {server_round}: only institution {senders} sent a usable "
                               "update; an aggregate of one update is that update, and the "
                               "institutions refuse to decrypt it. Encrypted rounds need at least "
                               "2 updates (min-train-nodes >= 2)")
        weights = [self.weight_of(u) for u in updates]
        steps = sum(w * float(u.meta[TRAIN_STEPS]) for w, u in zip(weights, updates)) / sum(weights)
        env = add_updates(self.keys, updates, self.multipliers(updates), run=self.run_id,
                          server_round=server_round,
                          max_units=self.quantization.max_clients * self.quantization.max_multiplier,
                          meta={"lr": self.round_lr, "steps": float(steps or 1.0),
                                "pfm_beta": self.pfm_beta})
        metrics = MetricRecord({HE_CLIENTS: len(updates),
                                HE_BYTES: int(sum(len(c) for c in env.chunks))})
        return to_record(env), metrics

    def global_arrays(self, aggregate: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
        """The aggregate envelope, as it is: clients decrypt it into the global model."""
        return aggregate

    # ----------------------------------------------------------------- after the round
    def commit(self, server_round: int, index: int, arrays: ArrayRecord,
               missed: set[int]) -> None:
        """Clients commit candidate ``index`` of ``server_round`` with the next message
        (the aggregate is kept for catch-up); members in ``missed`` catch up next round."""
        self.commit_point = (server_round, index)
        self.history[server_round] = arrays
        for r in sorted(self.history)[:-self.keep_rounds]:
            del self.history[r]
        self.lagging |= set(missed) & self.members

    def round_record(self, host: RoundHost, server_round: int, arrays: ArrayRecord,
                     good: list[Message]) -> dict:
        """The round's ``encryption`` figures (plaintext metadata only): the server holds
        only the aggregate ciphertext, so there is no plaintext model to test."""
        meta = aggregate_meta(arrays)
        clipped = [float(m.content[METRICS].get(HE_CLIPPED, 0.0)) for m in good]
        record = {"clients": meta["count"], "multipliers": meta["multipliers"],
                  "weight_sum": round(meta["weight_sum"], 6),
                  "clipped_max": round(max(clipped, default=0.0), 6)}
        if self.caught_up:
            record["caught_up"] = self.caught_up
        return {"encryption": record}

    def checkpoint(self, host: RoundHost, server_round: int, arrays: ArrayRecord) -> None:
        """None: the server holds no plaintext model (resuming is refused, RunConfig)."""

    def catch_up(self, grid: Grid, timeout: float) -> None:
        """Send the lagging nodes the committed aggregates they missed; who caught up goes
        into the round's record."""
        self.caught_up = []
        if not self.lagging or not self.history:
            return
        content = RecordDict({CONFIG: self.he_config(ConfigRecord({HE_CATCH_UP: True}))})
        for r, record in self.history.items():
            content[f"{HE_ROUND_PREFIX}{r:05d}"] = record
        for node in sorted(self.lagging):
            reply = self._query(grid, [node], content, timeout)
            if reply and not reply[0].has_error():
                self.lagging.discard(node)
                self.caught_up.append({"node": node,
                                       "caught_up_to": int(reply[0].content[METRICS][HE_ROUND])})
            elif reply:
                code, reason = reply_error(reply[0])
                self.caught_up.append({"node": node, "code": code, "reason": reason})
            else:
                self.caught_up.append({"node": node, "reason": "no reply"})

    def _is_verified(self, record: ArrayRecord, server_round: int) -> bool:
        """Whether screen() verified ``record`` (this very object) for ``server_round``."""
        hit = self._verified.get(id(record))
        return hit is not None and hit[0] == server_round and hit[1] is record

    def release(self, grid: Grid, arrays: ArrayRecord, timeout: float
                ) -> tuple[ArrayRecord, dict]:
        """The final model in plaintext from the first institution that returns it, and
        the run's ``encryption`` metadata saying which one."""
        # The join's folders let an institution find its data and DP ledger (its check of
        # an early release after a budget stop).
        config = self.he_config(ConfigRecord({HE_RELEASE: True, **self.dirs}))
        problems = []
        for node in sorted(grid.get_node_ids()):
            reply = self._query(grid, [node], RecordDict({CONFIG: config}), timeout)
            if reply and not reply[0].has_error() and ARRAYS in reply[0].content.array_records:
                return reply[0].content[ARRAYS], {"encryption": {**self.summary,
                                                                 "released_by_node": node}}
            why = reply_error(reply[0])[1] if reply and reply[0].has_error() else (
                "no model in the reply" if reply else "no reply")
            problems.append(f"node {node}: {why}")
        raise RuntimeError("No institution released the final model: " + "; ".join(problems[:5]))


def aggregate_meta(record: ArrayRecord) -> dict:
    """Plaintext metadata of an aggregate envelope (weights, multipliers, senders)."""
    return from_record(record).meta
