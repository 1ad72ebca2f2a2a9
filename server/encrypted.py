"""Encrypted aggregation: a Flower strategy that adds ciphertexts and never sees an update.

:class:`EncryptedFedAvg` replaces FedAvg's averaging with the sum of the clients'
encrypted updates (:func:`crypto.update.add_updates`). The clients hold the global model
and the secret key; the protocol per run:

1. **Join** (a ``query`` message to every node): the public initial backbone and the
   run id go out; each institution checks that it holds the server's key fingerprint and
   replies a join proof (:func:`crypto.update.prove_join`): its ceremony index and sample
   count, signed with its own Ed25519 private key over the run, its node id, the index and
   the count. The server verifies it with that index's public key, binds the node to
   that index (two nodes proving one index are both refused) and takes the weight
   reference ``he-weight-ref`` (the largest proven count).
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

**Masks** (``masks``, on by default in runs; :mod:`crypto.masks`, :mod:`server.masking`):
after the join each member's signed run key goes to its neighbours (a ``query``) and
each replies a signed key for the first exchange, with its private half Shamir-shared
and sealed to its holders. Every training message names the exchange's participants
and carries their keys; each institution masks its packed update before encrypting it
(masks that cancel only in the sum) and replies its self-mask seed's shares, sealed.
After screening, :meth:`EncryptedFedAvg.settle` names the survivors to them (a
``query``); they return the shares asked (self-mask seeds of survivors, exchange keys
of the dropped) and their next exchange key; the server rebuilds and checks those
secrets and subtracts the masks left from the encrypted sum. Too few shares abort the
exchange and :func:`server.loop.run_federated` runs it again with those still there.

Dropouts: unmasked, the sum is over whichever clients replied, and the weights that
divide it are the authenticated metadata of exactly those clients; masked, the same
after the unmasking has removed the dropped institutions' masks.

**Checkpoints.** After every round the server writes ``OUT/checkpoint.pt``
(:mod:`server.checkpoint`, no plaintext model) with :meth:`EncryptedFedAvg.state_dict`:
the run id, the key fingerprint and generation, the commit point, the kept aggregate
envelopes (ciphertexts it cannot decrypt), the members and their bound indices, the
lagging institutions, the weight reference and the run summary. Each institution saves
its own state (global model, momentum, round, pending candidate) in its own state folder
after every change (:func:`client.he.save_state`); nothing of it goes to the server.
``fedface train --resume OUT`` restores the strategy, refuses a checkpoint of another key
ceremony before anything is sent, and :meth:`EncryptedFedAvg.rejoin` asks every node to
rejoin the checkpointed run: each restores its own saved state, commits the candidate
named by the commit point, re-proves its index (node ids may change across a restart)
and says which round it holds; one behind is caught up from the kept aggregates, one
without a state of this run (another run, no state) is left out with the reason.
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
from crypto.masks import MaskError, MaskSettings, mask_bytes, pack_doc, unpack_doc
from crypto.packing import Layout, float_keys
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
    HE_COMMIT_TAG,
    HE_FINGERPRINT,
    HE_JOIN,
    HE_MASK,
    HE_MASK_ADVERT,
    HE_MASK_EPOCH,
    HE_MASK_SESSION,
    HE_MASK_SETUP,
    HE_REJOIN,
    HE_RELEASE,
    HE_ROUND,
    HE_ROUND_PREFIX,
    HE_RUN,
    HE_UNMASK,
    HE_WEIGHT_REF,
    METRICS,
    NODE_HE_SENDER,
    NUM_EXAMPLES,
    STATE_DIR,
    UNIT_WEIGHT,
    TrainInstructions,
    numpy_record,
    record_numpy,
)
from server.lifecycle import Lifecycle, RoundHost, check_state
from server.masking import MaskCoordinator, RoundAborted
from server.screening import Screening, exchange, reply_error


class EncryptedFedAvg(Lifecycle, FedAvg):
    """FedAvg (and PFM, FedProx) over homomorphically encrypted updates.

    Its round lifecycle (:class:`server.lifecycle.Lifecycle`) is the protocol above:
    :meth:`join`, :meth:`screen` (envelopes), :meth:`commit`, :meth:`catch_up` and
    :meth:`release`; the server holds no plaintext model to test, and checkpoints only
    ciphertexts and metadata (:meth:`state_dict`); a resumed run rejoins (:meth:`rejoin`).

    Parameters
    ----------
    keys : ServerKeys
        The server bundle: BFV parameters, the server's own signing key and the
        institutions' public keys, no secret key.
    quantization : Quantization
        The packing settings clients use (bits, clip, headroom).
    pfm_beta : float (default: 0.0)
        PFM's momentum coefficient; clients apply the momentum (0: FedAvg).
    proximal_mu : float (default: 0.0)
        FedProx's proximal weight, sent to clients.
    keep_rounds : int (default: 8)
        Committed aggregates kept for institutions that missed rounds (catch-up).
    masks : MaskSettings or None (default: None)
        Mask every update with masks that cancel only in the round's sum
        (:mod:`crypto.masks`, :mod:`server.masking`); None: unmasked updates.
    **kwargs
        FedAvg's sampling and key options (``weighted_by_key`` picks sample counts or
        uniform weights).
    """

    def __init__(self, keys: ServerKeys, quantization: Quantization, pfm_beta: float = 0.0,
                 proximal_mu: float = 0.0, keep_rounds: int = 8,
                 masks: MaskSettings | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mask_settings = masks
        self.mask_session = ""  # one per join or rejoin (bound into every mask key)
        self._tag: tuple[int, str] = (-1, "")  # (round, tag) of the committed aggregate
        self.masks: MaskCoordinator | None = None  # the run's masks (after the join)
        self._participants: list[int] = []  # senders asked to mask in this exchange
        self._skipped: list[dict] = []  # nodes not asked to train (no key), with the reason
        self._unmask: tuple[int, np.ndarray] | None = None  # (round, masks left in the sum)
        self.mask_record: dict = {}  # this round's mask figures
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
        tag = self._commit_tag()
        if tag:  # which aggregate: institutions commit only that one
            config[HE_COMMIT_TAG] = tag
        if self.mask_settings is not None:
            config[HE_MASK_SESSION] = self.mask_session
        return config

    def _commit_tag(self) -> str:
        """The signature (hex) of the committed round's aggregate ("" before round 1)."""
        rnd = int(self.commit_point[0])
        if self._tag[0] != rnd:
            committed = self.history.get(rnd)
            self._tag = (rnd, from_record(committed).tag.hex() if committed is not None else "")
        return self._tag[1]

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
        self._new_mask_session(config)
        replies = self._query(grid, nodes, RecordDict({ARRAYS: arrays, CONFIG: config}), timeout)
        excluded, counts = self._bind(nodes, replies)
        self._check_joined(counts, nodes, excluded, "Encrypted run cannot start", "joined")
        self.weight_ref = max(counts) if self.weighted_by_key == NUM_EXAMPLES else 0
        self.summary = self.summary_record(record_numpy(arrays), {
            "nodes": len(nodes), "joined": len(counts), "join_excluded": excluded,
            "weight_ref": self.weight_ref, "fingerprint": self.keys.fingerprint,
            "generation": self.keys.generation,
            "senders": {str(n): k for n, k in sorted(self.bound.items())}})
        self._start_masks(grid, replies, timeout)
        return {"encryption": self.summary}

    def rejoin(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float
               ) -> dict:
        """Resume the run restored by :meth:`load_state_dict`: every node is asked to
        rejoin it (its run id and commit point; no model goes out). Each institution
        restores its own saved state and re-proves its index, and is bound anew (node ids
        may change across a restart); one that holds an earlier round than the commit
        point is caught up before the next round. The weight reference stays the run's."""
        nodes = sorted(grid.get_node_ids())
        self.dirs = {k: str(config[k]) for k in (DATA_DIR, STATE_DIR) if k in config}
        config = self.he_config(config)
        config[HE_JOIN] = config[HE_REJOIN] = True
        self._new_mask_session(config)
        replies = self._query(grid, nodes, RecordDict({CONFIG: config}), timeout)
        lagging = {self.bound[n] for n in self.lagging if n in self.bound}  # the senders
        excluded, counts = self._bind(nodes, replies)
        self._check_joined(counts, nodes, excluded,
                           f"Encrypted run {self.run_id} cannot resume", "rejoined")
        held = {int(m.metadata.src_node_id): int(m.content[METRICS].get(HE_ROUND, -1))
                for m in replies if not m.has_error() and METRICS in m.content.metric_records}
        self.lagging = {n for n in self.members
                        if held.get(n) != self.commit_point[0] or self.bound[n] in lagging}
        self.summary.setdefault("rejoins", []).append({
            "after_round": int(self.commit_point[0]), "nodes": len(nodes),
            "joined": len(counts), "join_excluded": excluded,
            "lagging": sorted(self.bound[n] for n in self.lagging),
            "senders": {str(n): k for n, k in sorted(self.bound.items())}})
        self._start_masks(grid, replies, timeout)
        return {"encryption": self.summary}

    def _check_joined(self, counts: list[int], nodes: list[int], excluded: list[dict],
                      what: str, verb: str) -> None:
        """Refuse to go on with fewer members than ``min-train-nodes`` (the reasons of the
        first five excluded nodes in the error)."""
        if len(counts) < min(self.min_train_nodes, len(nodes)) or not counts:
            reasons = "; ".join(f"node {e['node']}: {e['reason'][:200]}" for e in excluded[:5])
            raise RuntimeError(f"{what}: {len(counts)} of {len(nodes)} institutions {verb}, "
                               f"min-train-nodes={self.min_train_nodes}. {reasons}")

    def _bind(self, nodes: list[int], replies: list[Message]) -> tuple[list[dict], list[int]]:
        """Verify the join proofs of ``replies``: bind each node to the ceremony index it
        proves (two nodes proving one index are both refused). Returns the excluded nodes
        with the reasons and the proven sample counts of the members."""
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
        return excluded, counts

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
        msgs = super().configure_train(server_round, ArrayRecord(), self.he_config(config), grid)
        return msgs if self.masks is None else self._masked_train(list(msgs), grid)

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
        out.excluded += self._skipped  # not asked to train: no key for the exchange (masks)
        self._skipped = []
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
                if self.masks is not None:
                    self._count_mask_bytes(up=mask_bytes(msg.content))
                    self.masks.take_update(sender, env.meta, unpack_doc(
                        msg.content.config_records.get(HE_MASK), "self-mask shares"),
                        self._participants)
                seen[sender] = node
                self._verified[id(record)] = (server_round, record, env)
            except EnvelopeError as err:
                out.excluded.append({"node": node, "reason": f"rejected envelope: {err}"})
                continue
            except MaskError as err:
                out.excluded.append({"node": node, "reason": f"rejected mask data: {err}"})
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
        unmask = None
        if self.masks is not None:
            if self._unmask is None or self._unmask[0] != server_round:
                raise RuntimeError(f"Round {server_round}: masked updates, but the masks that "
                                   "remain in their sum were not settled (settle() first)")
            layout = Layout.from_dict(updates[0].header["layout"])
            unmask = self._unmask[1].reshape(layout.ciphertexts, layout.slots)
        env = add_updates(self.keys, updates, self.multipliers(updates), run=self.run_id,
                          server_round=server_round,
                          max_units=self.quantization.max_clients * self.quantization.max_multiplier,
                          meta={"lr": self.round_lr, "steps": float(steps or 1.0),
                                "pfm_beta": self.pfm_beta}, unmask=unmask)
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
        self._tag = (-1, "")
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
        if self.masks is not None:
            record["masks"], self.mask_record = self.mask_record, {"aborted": []}
        return {"encryption": record}

    def checkpoint(self, host: RoundHost, server_round: int, arrays: ArrayRecord) -> None:
        """Checkpoint :meth:`state_dict` (ciphertexts and metadata) and no plaintext model:
        the server holds none (``arrays``, the aggregate envelope, is in the history)."""
        host.checkpoint(server_round, ArrayRecord(), self.state_dict())

    # Names of state_dict(); "extra" holds what later protocol steps add (_extra_state).
    STATE_NAMES = ("run_id", "fingerprint", "generation", "commit_point", "weight_ref",
                   "history", "members", "bound", "lagging", "dirs", "summary", "extra")

    def state_dict(self) -> dict:
        """What the server needs to resume the run, and nothing it could decrypt: the run
        id, the key ceremony (fingerprint, generation), the commit point, the committed
        aggregate envelopes kept for catch-up (uint8 ciphertext blobs), the members and
        their bound indices, the lagging nodes, the weight reference, the join's folders
        and the run summary."""
        return {
            "run_id": self.run_id, "fingerprint": self.keys.fingerprint,
            "generation": int(self.keys.generation),
            "commit_point": [int(x) for x in self.commit_point],
            "weight_ref": int(self.weight_ref),
            "history": {str(r): {k: np.array(v) for k, v in record_numpy(rec).items()}
                        for r, rec in sorted(self.history.items())},
            "members": sorted(int(n) for n in self.members),
            "bound": {str(n): int(k) for n, k in sorted(self.bound.items())},
            "lagging": sorted(int(n) for n in self.lagging),
            "dirs": dict(self.dirs), "summary": copy.deepcopy(self.summary),
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; a checkpoint of another key ceremony (or
        of a plaintext run) is refused with the reason, before anything is sent."""
        check_state(self, state, self.STATE_NAMES)
        if "run_id" not in state:
            raise ValueError("Cannot resume: the checkpoint holds no encrypted run's state (it "
                             "was written by a plaintext run); resume with its own settings")
        theirs = (str(state["fingerprint"]), int(state["generation"]))
        if theirs != (self.keys.fingerprint, int(self.keys.generation)):
            raise ValueError(
                f"Cannot resume encrypted run {state['run_id']}: its checkpoint was written "
                f"under key fingerprint {theirs[0]} (generation {theirs[1]}), and he-keys now "
                f"holds fingerprint {self.keys.fingerprint} (generation "
                f"{self.keys.generation}); its kept aggregates are ciphertexts of that "
                "ceremony and its institutions hold its keys. Resume with the keys the run "
                "started with (a rotation keeps them under retired/gen-N), or start a new run")
        self.run_id = str(state["run_id"])
        self.commit_point = tuple(int(x) for x in state["commit_point"])
        self.weight_ref = int(state["weight_ref"])
        self.history = {int(r): numpy_record(rec) for r, rec in state["history"].items()}
        self.members = {int(n) for n in state["members"]}
        self.bound = {int(n): int(k) for n, k in state["bound"].items()}
        self.lagging = {int(n) for n in state["lagging"]}
        self.dirs = {str(k): str(v) for k, v in state["dirs"].items()}
        self.summary = copy.deepcopy(state["summary"])
        self._load_extra_state(state.get("extra", {}))

    def _extra_state(self) -> dict:
        """More state to checkpoint (later protocol steps add theirs here): none."""
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        """Restore :meth:`_extra_state`'s output."""

    def catch_up(self, grid: Grid, timeout: float) -> None:
        """Send the lagging nodes the committed aggregates they missed; who caught up goes
        into the round's record."""
        self.caught_up = []
        keyless: set[int] = set()
        if self.masks is not None:  # members without a key for the coming exchange ask one
            keyed = set(self.masks.epoch_adverts.get(self.masks.epoch, {}))
            keyless = {n for n in self.members if self.bound[n] not in keyed
                       and self.bound[n] in self.masks.members}
            self.lagging |= keyless
        if not self.lagging or not (self.history or keyless):
            return
        for node in sorted(self.lagging):
            config = ConfigRecord({HE_CATCH_UP: True})
            if node in keyless:
                config[HE_MASK_EPOCH] = self.masks.epoch
            content = RecordDict({CONFIG: self.he_config(config)})
            for r, record in self.history.items():
                content[f"{HE_ROUND_PREFIX}{r:05d}"] = record
            reply = self._query(grid, [node], content, timeout)
            if reply and not reply[0].has_error() and node in keyless:
                try:
                    self.masks.take_epoch_advert(self.bound[node], unpack_doc(
                        reply[0].content.config_records.get(HE_MASK_ADVERT), "epoch key"),
                        self.masks.epoch)
                except MaskError as err:
                    self.caught_up.append({"node": node, "reason": f"epoch key refused: {err}"})
                    continue
            if reply and not reply[0].has_error():
                self.lagging.discard(node)
                self.caught_up.append({"node": node,
                                       "caught_up_to": int(reply[0].content[METRICS][HE_ROUND])})
            elif reply:
                code, reason = reply_error(reply[0])
                self.caught_up.append({"node": node, "code": code, "reason": reason})
            else:
                self.caught_up.append({"node": node, "reason": "no reply"})

    # ----------------------------------------------------------------- masks
    def _node_of(self) -> dict[int, int]:
        return {k: n for n, k in self.bound.items() if n in self.members}

    def _new_mask_session(self, config: ConfigRecord) -> None:
        """A fresh mask session for a join or rejoin: every key and share is bound to it,
        so nothing of an earlier session (a rebuilt key above all) can be replayed."""
        if self.mask_settings is not None:
            self.mask_session = f"{self.run_id}.{secrets.token_hex(8)}"
            config[HE_MASK_SESSION] = self.mask_session

    def _start_masks(self, grid: Grid, replies: list[Message], timeout: float) -> None:
        """After the (re)join: take the members' signed run keys, send each its neighbours'
        and collect each member's first epoch key (with its shares, sealed). Members whose
        keys are refused are left out of the run, saying why."""
        if self.mask_settings is None:
            return
        self.masks = MaskCoordinator(self.mask_settings, self.mask_session, self.keys.verify_keys)
        node_of, adverts, excluded = self._node_of(), {}, []
        for m in replies:
            node = int(m.metadata.src_node_id)
            if node in self.members and not m.has_error():
                try:
                    adverts[self.bound[node]] = unpack_doc(
                        m.content.config_records.get(HE_MASK), "run key of the masks")
                except MaskError as err:
                    excluded.append({"node": node, "reason": f"mask setup refused: {err}"})
        excluded += [{"node": node_of[k], "reason": f"mask setup refused: {why}"}
                     for k, why in self.masks.start(adverts)]
        msgs = [grid.create_message(content=RecordDict({
                    CONFIG: self.he_config(ConfigRecord({HE_MASK_SETUP: True})),
                    HE_MASK: pack_doc(self.masks.setup_doc(k))}),
                    message_type=MessageType.QUERY, dst_node_id=node_of[k], group_id="he")
                for k in self.masks.members]
        setup_down = sum(mask_bytes(m.content) for m in msgs)
        answers = list(exchange(grid, msgs, timeout))
        setup_up = sum(mask_bytes(m.content) for m in answers if not m.has_error())
        setup_up += sum(mask_bytes(m.content) for m in replies if not m.has_error())  # run keys
        for m in answers:
            node = int(m.metadata.src_node_id)
            try:
                if m.has_error():
                    raise MaskError(reply_error(m)[1])
                self.masks.take_epoch_advert(self.bound[node], unpack_doc(
                    m.content.config_records.get(HE_MASK_ADVERT), "epoch key"), self.masks.epoch)
            except MaskError as err:
                excluded.append({"node": node, "reason": f"mask setup: {err}"})
        self.mask_record = {"aborted": []}
        dropped = {e["node"] for e in excluded}
        self.members -= {n for n in dropped if self.bound.get(n) not in self.masks.members}
        self.summary["masks"] = {**self.masks.summary(), "setup_excluded": excluded,
                                 "setup_bytes_per_member": round(
                                     (setup_down + setup_up) / max(len(msgs), 1))}

    def _count_mask_bytes(self, down: int = 0, up: int = 0) -> None:
        """Bytes of the round's mask messages (keys, shares, announcements), which travel
        beside the ciphertexts: in the round's ``encryption.masks.bytes``."""
        total = self.mask_record.setdefault("bytes", {"down": 0, "up": 0})
        total["down"] += int(down)
        total["up"] += int(up)

    def _masked_train(self, msgs: list[Message], grid: Grid) -> list[Message]:
        """The training messages of the members with a key for this exchange, each with
        its mask part (epoch, participants, its neighbours' signed epoch keys)."""
        keyed = set(self.masks.participants())
        sent = [m for m in msgs if self.bound.get(int(m.metadata.dst_node_id)) in keyed
                and int(m.metadata.dst_node_id) in self.members]
        joined = {e["node"]: e["reason"] for e in self.summary.get("join_excluded", [])}
        self._skipped = [{"node": n, "reason": (
            "no key for this masked exchange (it missed the key exchange); it takes part "
            "again once caught up" if n in self.members else
            f"not in this encrypted run: {joined.get(n, 'it did not join at the start')}")}
            for n in sorted(int(m.metadata.dst_node_id) for m in msgs if m not in sent)]
        self._participants = sorted(self.bound[int(m.metadata.dst_node_id)] for m in sent)
        out = []
        for m in sent:
            content = RecordDict(dict(m.content.items()))
            content[HE_MASK] = pack_doc(self.masks.train_doc(
                self.bound[int(m.metadata.dst_node_id)], self._participants))
            out.append(grid.create_message(content=content, message_type=MessageType.TRAIN,
                                           dst_node_id=int(m.metadata.dst_node_id),
                                           group_id=m.metadata.group_id))
        self._count_mask_bytes(down=sum(mask_bytes(m.content) for m in out))
        self.mask_record.setdefault("epochs", []).append(
            {"epoch": self.masks.epoch, "participants": self._participants,
             "without_key": sorted(self.bound[int(m.metadata.dst_node_id)] for m in msgs
                                   if m not in sent and int(m.metadata.dst_node_id) in self.bound)})
        return out

    def settle(self, grid: Grid, server_round: int, good: list[Message], timeout: float
               ) -> list[Message]:
        """Unmask: name the survivors to them, collect their shares (and their keys for
        the next exchange), rebuild what must be and compute the masks left in the sum.
        Raises :class:`server.masking.RoundAborted` when that cannot be done (the loop
        runs the round again with the institutions still there)."""
        if self.masks is None:
            return good
        survivors = sorted(self.bound[int(m.metadata.src_node_id)] for m in good)
        epoch = self.masks.epoch
        note = self.mask_record["epochs"][-1]
        note["survivors"] = survivors
        note["dropped"] = sorted(set(self._participants) - set(survivors))
        try:
            if len(survivors) < 2:
                raise RoundAborted(f"{len(survivors)} masked update(s) arrived; a sum needs 2")
            node_of = self._node_of()
            config = ConfigRecord({HE_UNMASK: True, HE_MASK_EPOCH: epoch + 1})
            msgs = [grid.create_message(content=RecordDict({
                        CONFIG: self.he_config(copy.deepcopy(config)), HE_MASK: pack_doc(doc)}),
                        message_type=MessageType.QUERY, dst_node_id=node_of[k], group_id="he")
                    for k, doc in self.masks.unmask_docs(survivors, self._participants).items()]
            shares, answered = {}, []
            self._count_mask_bytes(down=sum(mask_bytes(m.content) for m in msgs))
            for m in exchange(grid, msgs, timeout):
                if not m.has_error():
                    self._count_mask_bytes(up=mask_bytes(m.content))
                sender = self.bound[int(m.metadata.src_node_id)]
                try:
                    if m.has_error():
                        raise MaskError(reply_error(m)[1])
                    shares[sender] = unpack_doc(m.content.config_records.get(HE_MASK), "shares")
                    self.masks.take_epoch_advert(sender, unpack_doc(
                        m.content.config_records.get(HE_MASK_ADVERT), "epoch key"), epoch + 1)
                    answered.append(sender)
                except MaskError as err:
                    note.setdefault("refused", []).append({"institution": sender,
                                                           "reason": str(err)[:300]})
            note["unmask_answered"] = sorted(answered)
            env = self._verified[id(good[0].content[ARRAYS])][2]
            layout = Layout.from_dict(env.header["layout"])
            count = layout.ciphertexts * layout.slots
            self._unmask = (server_round, self.masks.correction(
                shares, count, self.keys.context.plain_modulus))
        except RoundAborted as err:
            refused = "; ".join(f"institution {r['institution']}: {r['reason'][:200]}"
                                for r in note.get("refused", []))
            reason = str(err) + (f" (refused: {refused})" if refused else "")
            note["aborted"] = reason
            self.mask_record["aborted"].append({"epoch": epoch, "reason": reason})
            if note.get("unmask_answered"):
                # Those that answered have released their update in this sum: the same
                # updates (a re-run recomputes them) are never unmasked in another.
                raise RoundAborted(
                    f"{reason}. Institutions {note['unmask_answered']} already answered for "
                    f"survivors {survivors}: round {server_round} can complete only with the "
                    "same survivors (a second sum of the same updates would reveal them). "
                    "Resume (`fedface train --resume`) once they are all back, or start a new "
                    "run with another seed", final=True) from None
            raise RoundAborted(reason) from None
        finally:
            self.masks.next_epoch()
        return good

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
