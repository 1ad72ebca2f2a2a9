"""Screen client replies before aggregation.

A reply is excluded, with a logged reason, when its arrays do not match the global
backbone (missing or unexpected keys, wrong shapes, wrong dtype), hold NaN or Inf, its
metrics lack ``num-examples``, or its update norm per local step is far outside the
round's distribution (more than ``max_ratio`` times the median). A client that timed out
or crashed is the same case: it simply has no usable reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from fedface.protocol import ARRAYS, METRICS, NUM_EXAMPLES, error_reason


@dataclass
class Screening:
    """Outcome of :func:`screen_replies`: the good replies and the excluded ones."""

    good: list[Message] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)  # {"node", "reason"}
    update_norms: dict[int, float] = field(default_factory=dict)


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
    total = 0.0
    for key, ref in reference.items():
        if ref.dtype.kind == "f":
            d = record[key].numpy().astype(np.float64) - ref
            total += float(np.dot(d.ravel(), d.ravel()))
    return float(np.sqrt(total))


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
                   max_ratio: float = 10.0) -> Screening:
    """Split replies into aggregatable ones and excluded ones with reasons."""
    out = Screening()
    candidates = []
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            out.excluded.append({"node": node, "reason": f"client error: {error_reason(msg)}"})
            continue
        reason = check_reply(msg.content, reference)
        if reason is not None:
            out.excluded.append({"node": node, "reason": reason})
            continue
        steps = float(msg.content[METRICS].get("train-steps", 1) or 1)
        out.update_norms[node] = update_norm(msg.content, reference) / max(steps, 1.0)
        candidates.append(msg)
    outliers = norm_outliers(out.update_norms, max_ratio=max_ratio)
    for msg in candidates:
        node = int(msg.metadata.src_node_id)
        if node in outliers:
            out.excluded.append({"node": node, "reason": outliers[node]})
        else:
            out.good.append(msg)
    return out
