"""Screen client replies before aggregation.

A reply is excluded, with a logged reason, when its arrays do not match the global
backbone (missing or unexpected keys, wrong shapes, wrong dtype), hold NaN or Inf, its
metrics lack ``num-examples``, or its update norm per local step is far outside the
round's distribution (more than ``max_ratio`` times the median). A client that timed out
or crashed is the same case: it simply has no usable reply.

Error replies are read by their typed code (``fedface.protocol.ERR_*``): the loop acts
on it (a spent privacy budget, an encrypted run's client out of sync), and the record of
an excluded error reply keeps the client's reason and the code (:func:`client_error`,
the one client-error branch of the plaintext and the encrypted screening).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedface.momentum import norm
from fedface.protocol import (
    ARRAYS,
    ERR_DP_BUDGET_SPENT,
    ERR_OUT_OF_SYNC,
    METRICS,
    NUM_EXAMPLES,
    TRAIN_STEPS,
    UNIT_WEIGHT,
    error_reason,
)

# Flower's own error codes are below this; fedface's (ERR_*) are above.
FLOWER_CODES = 100


def reply_error(msg: Message) -> tuple[int, str]:
    """``(code, reason)`` of an error reply: the client's typed code and its reason. The
    server acts on the code alone; Flower's own codes (a crash outside fedface's typed
    replies) keep theirs, with the runtime's wrapping taken off the reason."""
    code, reason = int(msg.error.code), str(msg.error.reason)
    if code < FLOWER_CODES:
        reason = error_reason(msg)
    return code, reason


def client_error(msg: Message) -> dict:
    """The excluded-reply record of an error reply: node, typed code and reason."""
    code, reason = reply_error(msg)
    return {"node": int(msg.metadata.src_node_id), "code": code,
            "reason": f"client error: {reason}"}


@dataclass
class Screening:
    """Outcome of a strategy's ``screen``: the good replies and the excluded ones."""

    good: list[Message] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)  # {"node", "reason"[, "code"]}
    update_norms: dict[int, float] = field(default_factory=dict)

    def usable(self, replies: list[Message]) -> Iterator[Message]:
        """The replies left to check, in order; each error reply is recorded as excluded
        on the way (the one client-error branch of every strategy's screening)."""
        for msg in replies:
            if msg.has_error():
                self.excluded.append(client_error(msg))
            else:
                yield msg


def exchange(grid: Grid, msgs: list[Message], timeout: float) -> list[Message]:
    """``grid.send_and_receive``, with each reply addressed from the node it answers for.

    When a node is lost mid-round (a deployed SuperNode killed, its heartbeat missed),
    Flower's SuperLink answers in its place with ``NODE_UNAVAILABLE`` and its own id as
    the sender; such a reply is re-made as a reply of the node the message went to, so
    that the round's record names that node (once) and the node catches up later.
    """
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    sent = {m.metadata.message_id: m for m in msgs
            if isinstance(m, Message) and m.metadata.message_id}
    if not sent:
        return replies
    nodes = {int(m.metadata.dst_node_id) for m in sent.values()}
    out = []
    for r in replies:
        orig = sent.get(r.metadata.reply_to_message_id)
        if r.has_error() and int(r.metadata.src_node_id) not in nodes and orig is not None:
            r = Message(r.error, reply_to=orig)
        out.append(r)
    return out


def timeouts(sent: list[Message], replies: list[Message]) -> list[dict]:
    """Excluded-reply records of the nodes that did not reply at all."""
    replied = {int(m.metadata.src_node_id) for m in replies}
    return [{"node": int(m.metadata.dst_node_id), "reason": "no reply before the round timeout"}
            for m in sent if int(m.metadata.dst_node_id) not in replied]


def missed(sent: list[Message], replies: list[Message], excluded: list[dict]) -> set[int]:
    """Nodes that missed an exchange: no good reply to ``sent``, or out of sync."""
    ok = {int(m.metadata.src_node_id) for m in replies if not m.has_error()}
    return ({int(m.metadata.dst_node_id) for m in sent} - ok
            | {e["node"] for e in excluded if e.get("code") == ERR_OUT_OF_SYNC})


def budgets_spent(excluded: list[dict]) -> bool:
    """Whether every excluded reply declined because its privacy budget is spent."""
    return bool(excluded) and all(e.get("code") == ERR_DP_BUDGET_SPENT for e in excluded)


def check_reply(content, reference: dict[str, np.ndarray]) -> str | None:
    """Why this reply's content cannot be aggregated, or None if it can."""
    if ARRAYS not in content.array_records:
        return f"no '{ARRAYS}' ArrayRecord in the reply"
    if METRICS not in content.metric_records:
        return f"no '{METRICS}' MetricRecord in the reply"
    metrics = content.metric_records[METRICS]
    n = metrics.get(NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or not np.isfinite(n) or n <= 0:
        return f"'{NUM_EXAMPLES}' missing or not a positive number ({n!r})"
    record: ArrayRecord = content.array_records[ARRAYS]
    missing = sorted(set(reference) - set(record))
    unexpected = sorted(set(record) - set(reference))
    if missing:
        return f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}"
    if unexpected:
        return f"unexpected keys {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
    for key, ref in reference.items():
        arr = record[key]
        if tuple(arr.shape) != tuple(ref.shape):
            return f"'{key}' has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}"
        if np.dtype(arr.dtype) != ref.dtype:
            return f"'{key}' has dtype {arr.dtype}, expected {ref.dtype}"
        if ref.dtype.kind == "f" and not np.isfinite(arr.numpy()).all():
            return f"'{key}' holds NaN or Inf values"
    return None


def update_norm(content, reference: dict[str, np.ndarray]) -> float:
    """L2 norm of (reply - global) over the floating-point arrays."""
    record = content.array_records[ARRAYS]
    return norm({k: record[k].numpy().astype(np.float64) - ref
                 for k, ref in reference.items() if ref.dtype.kind == "f"})


def norm_outliers(norms: dict[int, float], max_ratio: float = 10.0,
                  min_count: int = 3) -> dict[int, str]:
    """Nodes whose update norm (per local step) is far above the round's median.

    Honest updates differ by a few times (data size, identities); broken or hostile ones
    by orders of magnitude. A node is excluded when its norm exceeds ``max_ratio`` times
    the median; with fewer than ``min_count`` replies nothing is flagged.
    """
    if len(norms) < min_count:
        return {}
    med = float(np.median(list(norms.values())))
    out = {}
    for node, v in norms.items():
        if v > max_ratio * max(med, 1e-12):
            out[node] = (f"update norm per step {v:.3g} is {v / max(med, 1e-12):.1f}x the "
                         f"round's median {med:.3g} (limit {max_ratio:g}x)")
    return out


def screen_replies(replies: list[Message], reference: dict[str, np.ndarray],
                   max_ratio: float = 10.0, unit_weight: bool = False) -> Screening:
    """Split replies into aggregatable ones and excluded ones with reasons.

    ``max_ratio=inf`` turns the norm-outlier screening off; ``unit_weight`` (central DP)
    excludes a reply whose ``unit-weight`` is not 1 (a client weighting itself down
    would be counted as aggregated while barely contributing)."""
    out = Screening()
    candidates = []
    for msg in out.usable(replies):
        node = int(msg.metadata.src_node_id)
        reason = check_reply(msg.content, reference)
        if reason is None and unit_weight and msg.content[METRICS].get(UNIT_WEIGHT) != 1:
            reason = (f"'{UNIT_WEIGHT}' is {msg.content[METRICS].get(UNIT_WEIGHT)!r}: central DP "
                      "aggregates every client with weight 1")
        if reason is not None:
            out.excluded.append({"node": node, "reason": reason})
            continue
        steps = float(msg.content[METRICS].get(TRAIN_STEPS, 1) or 1)
        out.update_norms[node] = update_norm(msg.content, reference) / max(steps, 1.0)
        candidates.append(msg)
    outliers = (norm_outliers(out.update_norms, max_ratio=max_ratio)
                if np.isfinite(max_ratio) else {})
    for msg in candidates:
        node = int(msg.metadata.src_node_id)
        if node in outliers:
            out.excluded.append({"node": node, "reason": outliers[node]})
        else:
            out.good.append(msg)
    return out
