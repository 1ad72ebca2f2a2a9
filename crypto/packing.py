"""Flatten, clip, quantize and pack a model update into BFV slots, and back.

The layout (a :class:`Layout`, carried in every envelope header):

1. **Flatten** the floating-point arrays of the backbone, in key order (integer buffers
   such as BatchNorm's ``num_batches_tracked`` are not federated: clients keep theirs).
2. **Clip** each value to ``[-clip, clip]``.
3. **Quantize** to ``bits`` unsigned bits with *stochastic rounding*:
   ``u = floor((x + clip) / step + r)``, ``r ~ U[0, 1)``, ``step = 2 clip / (2^bits - 1)``.
   The rounding is unbiased (``E[u step - clip] = x``) and each value's error is below
   one ``step``.
4. **Pack** ``digits`` values into one slot, ``digit_bits = bits + headroom`` bits apart,
   where the headroom holds the sum over the largest number of clients (times the
   largest server multiplier): sums never carry from one digit into the next, and the
   slot stays below the plaintext modulus t.

**Quantization error bound.** After the server's weighted sum ``sum_k m_k u_k`` and the
decoding ``(sum_k m_k u_k step - clip sum_k m_k) / sum_k m_k s_k`` (``s_k`` the clients'
own pre-scaling weights), the error of each value of the weighted mean is below
``step * sum_k m_k / sum_k m_k s_k`` (it is ``step`` for equal weights), plus whatever
clipping removed; its standard deviation is about ``step / 2`` divided by the square root
of the number of clients. ``fedface bench he`` prints the bound next to the measured error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """How a flat vector of ``length`` values sits in ciphertext slots."""

    length: int
    bits: int
    digit_bits: int
    digits: int
    clip: float
    slots: int

    @property
    def step(self) -> float:
        return 2.0 * self.clip / (2 ** self.bits - 1)

    @property
    def values_per_ciphertext(self) -> int:
        return self.slots * self.digits

    @property
    def ciphertexts(self) -> int:
        return max(1, math.ceil(self.length / self.values_per_ciphertext))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Layout:
        return cls(length=int(d["length"]), bits=int(d["bits"]), digit_bits=int(d["digit_bits"]),
                   digits=int(d["digits"]), clip=float(d["clip"]), slots=int(d["slots"]))


def make_layout(length: int, bits: int, clip: float, max_clients: int, max_multiplier: int,
                slots: int, plain_bits: int) -> Layout:
    """Choose digits per slot for ``bits``-bit values summed over ``max_clients`` clients.

    Raises ValueError, naming what to lower, when not even one value fits a slot.
    """
    if not 2 <= bits <= 30:
        raise ValueError(f"he_bits={bits}: use 2..30 quantization bits")
    if clip <= 0 or not math.isfinite(clip):
        raise ValueError(f"he_clip={clip}: use a positive clipping range")
    if max_clients < 1 or max_multiplier < 1:
        raise ValueError("he_max_clients and the multiplier bound must be at least 1")
    headroom = math.ceil(math.log2(max_clients * max_multiplier)) if max_clients * max_multiplier > 1 else 0
    digit_bits = bits + headroom
    usable = plain_bits - 1  # t is a prime just below 2^plain_bits
    digits = usable // digit_bits
    if digits < 1:
        raise ValueError(
            f"{bits} bits + {headroom} bits of headroom ({max_clients} clients x multipliers up "
            f"to {max_multiplier}) do not fit a {plain_bits}-bit plaintext slot: lower he_bits "
            "or he_max_clients, or run a key ceremony with larger plain_bits")
    return Layout(length=int(length), bits=bits, digit_bits=digit_bits, digits=digits,
                  clip=float(clip), slots=int(slots))


def quantize(values: np.ndarray, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Clip and stochastically round to ``layout.bits``; returns (uint64 codes, share clipped)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size != layout.length:
        raise ValueError(f"update of {x.size} values does not match the layout ({layout.length})")
    if not np.isfinite(x).all():
        raise ValueError("update holds NaN or Inf values: refusing to encrypt it")
    clipped = float(np.mean(np.abs(x) > layout.clip)) if x.size else 0.0
    y = (np.clip(x, -layout.clip, layout.clip) + layout.clip) / layout.step
    u = np.floor(y + rng.random(x.size))
    return np.clip(u, 0, 2 ** layout.bits - 1).astype(np.uint64), clipped


def pack(codes: np.ndarray, layout: Layout) -> np.ndarray:
    """Codes -> slot matrix (ciphertexts, slots) with ``digits`` codes per slot."""
    per = layout.values_per_ciphertext
    total = layout.ciphertexts * per
    flat = np.zeros(total, dtype=np.uint64)
    flat[: codes.size] = codes
    planes = flat.reshape(layout.ciphertexts, layout.digits, layout.slots)
    out = np.zeros((layout.ciphertexts, layout.slots), dtype=np.uint64)
    for j in range(layout.digits):
        out |= planes[:, j, :] << np.uint64(layout.digit_bits * j)
    return out


def unpack(slots: np.ndarray, layout: Layout) -> np.ndarray:
    """Slot matrix -> summed codes (uint64, ``layout.length`` values)."""
    mask = np.uint64(2 ** layout.digit_bits - 1)
    planes = [(slots >> np.uint64(layout.digit_bits * j)) & mask for j in range(layout.digits)]
    flat = np.stack(planes, axis=1).reshape(-1)
    return flat[: layout.length]


def dequantize_sum(sums: np.ndarray, layout: Layout, multiplier_sum: float,
                   weight_sum: float) -> np.ndarray:
    """Weighted mean from summed codes: ``(sum m u step - clip sum m) / sum m s``."""
    if weight_sum <= 0:
        raise ValueError("aggregate weight sum must be positive")
    total = sums.astype(np.float64) * layout.step - layout.clip * multiplier_sum
    return (total / weight_sum).astype(np.float32)


def error_bound(layout: Layout, multiplier_sum: float, weight_sum: float) -> float:
    """Largest quantization error of a decoded mean (values within the clip range)."""
    return layout.step * multiplier_sum / weight_sum


# ------------------------------------------------------------------ model <-> vector
def float_keys(state: dict[str, np.ndarray]) -> list[str]:
    """Keys of the floating-point arrays, the part of a backbone that is aggregated."""
    return [k for k, v in state.items() if np.asarray(v).dtype.kind == "f"]


def flatten(state: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(state[k], np.float32).ravel() for k in keys]) if keys \
        else np.zeros(0, np.float32)


def unflatten(vector: np.ndarray, like: dict[str, np.ndarray], keys: list[str]) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for k in keys:
        ref = np.asarray(like[k])
        out[k] = vector[i: i + ref.size].reshape(ref.shape).astype(ref.dtype)
        i += ref.size
    if i != vector.size:
        raise ValueError(f"vector of {vector.size} values does not match the model ({i})")
    return out


def spec_digest(state: dict[str, np.ndarray], keys: list[str]) -> str:
    """Short hash of the keys and shapes that a layout packs (both sides must agree)."""
    import hashlib

    blob = ";".join(f"{k}:{tuple(np.asarray(state[k]).shape)}" for k in keys)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- integers
#: Signed 64-bit integers travel as four 16-bit limbs (two's complement), one code each:
#: limbs add without carrying into each other, and the total is read back modulo 2^64.
LIMB_BITS = 16
LIMBS = 4


def integer_layout(length: int, max_senders: int, slots: int, plain_bits: int) -> Layout:
    """The layout of ``length`` signed 64-bit integers summed over up to ``max_senders``
    senders (exact while the true total stays within int64)."""
    return make_layout(length * LIMBS, bits=LIMB_BITS, clip=1.0, max_clients=max_senders,
                       max_multiplier=1, slots=slots, plain_bits=plain_bits)


def pack_integers(values: np.ndarray, layout: Layout) -> np.ndarray:
    """int64 values -> slot matrix (their limbs, :func:`pack`)."""
    u = np.asarray(values, dtype=np.int64).ravel().view(np.uint64)
    if u.size * LIMBS != layout.length:
        raise ValueError(f"{u.size} integers do not match the layout ({layout.length // LIMBS})")
    limbs = np.stack([(u >> np.uint64(LIMB_BITS * j)) & np.uint64(2**LIMB_BITS - 1)
                      for j in range(LIMBS)], axis=1)
    return pack(limbs.reshape(-1), layout)


def unpack_integers(slots: np.ndarray, layout: Layout) -> list[int]:
    """Summed slot matrix -> the signed totals (Python integers)."""
    limbs = unpack(np.asarray(slots, dtype=np.uint64), layout).reshape(-1, LIMBS)
    out = []
    for row in limbs.tolist():
        v = sum(int(x) << (LIMB_BITS * j) for j, x in enumerate(row)) % 2**64
        out.append(v - 2**64 if v >= 2**63 else v)
    return out
