"""Masks that cancel in a sum: secure aggregation under (and beside) the encryption.

Every institution holds the BFV secret key, so a server that colludes with one of them
could decrypt any single encrypted update. Masks close that hole: each institution adds
to its packed plaintext, before encrypting it, random values that cancel in the sum of
the round's updates and in nothing less. This is the double-masking protocol of
Bonawitz et al. (CCS 2017), on the sparse neighbour graph of SecAgg+ (Bell et al., CCS
2020), in the plaintext ring of the BFV slots: every value is an integer modulo the
plaintext modulus ``t`` and so is every mask, so the decrypted masked sum is exactly
the unmasked sum (the packing's headroom keeps that sum below ``t``).

For institution ``u`` in mask epoch ``e`` (one epoch per training exchange):

- **pairwise masks**: for each neighbour ``v`` taking part, ``+PRG(s_uv)`` if ``u < v``
  and ``-PRG(s_uv)`` otherwise, where ``s_uv`` comes from an X25519 agreement between
  ``u``'s and ``v``'s *epoch* keys (fresh key pairs each epoch, advertised one exchange
  ahead and signed with the institution's Ed25519 key): they cancel pair by pair;
- **a self mask** ``PRG(b_u)`` with a fresh 32-byte ``b_u``, removed by the server once
  it knows which updates are in the sum (so a server that falsely calls ``u`` dropped
  learns nothing: it gets either ``b_u`` or ``u``'s epoch key, never both).

Dropouts: ``b_u`` and the epoch's private key are Shamir-shared (Flower's
``secure_aggregation`` helpers, over GF(2^128)) among ``u``'s *holders*, its neighbours
and itself, with threshold ``floor(threshold * (holders + 1)) + 1`` (default 0.5: a
majority of the holders and one more when their number is odd, see :class:`MaskSettings`).
Each share travels encrypted to its holder (AES-256-GCM under an X25519 key between the
two institutions' run keys, bound to run, epoch, kind, owner and holder) through the
server, which cannot read it. After the training exchange the server names the
survivors; each holder returns the shares of ``b_u`` for survivors and of the epoch key
of the dropped, never both for one institution. The server reconstructs them (checking
``b_u`` against the commitment in ``u``'s signed update and each key against its signed
public key), computes the masks that do not cancel (:func:`correction`) and subtracts
them from the encrypted sum with a plaintext subtraction. Since the keys are per epoch,
a reconstructed key reveals one exchange's masks and no other. The ``run`` every
function takes is the mask *session* (the run id and a fresh nonce per join or rejoin):
keys and shares of another session do not verify.

The PRG is AES-256 in counter mode keyed by HKDF-SHA256 of the seed and a label naming
run, epoch and pair; values are drawn uniformly modulo ``t`` by rejection sampling.

The graph: the run's members, in an order drawn from the run id, on a ring; each is
linked to the ``degree / 2`` nearest on either side (a Harary graph, as in SecAgg+).
``degree`` 0 picks :func:`auto_degree`: every other member up to 16 institutions,
``2 * ceil(2 * log2 n)`` beyond, so an institution's setup and masking cost grows as
``log n``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.app import ConfigRecord
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

SELF = "self"  # share kinds
EPOCH_KEY = "epoch-key"
_LABEL = "fedface/masks/v1"
DOC = "doc"  # the one field of a mask message's ConfigRecord
COMPLETE_UP_TO = 16  # auto_degree: a complete graph up to this many members


class MaskError(ValueError):
    """A mask message that must not be used, and why."""


# ----------------------------------------------------------------------- the graph
def auto_degree(n: int) -> int:
    """Neighbours per institution: all others up to :data:`COMPLETE_UP_TO` members, then
    ``2 * ceil(2 * log2 n)`` (even, so the ring links ``degree / 2`` on each side)."""
    if n <= COMPLETE_UP_TO:
        return max(n - 1, 0)
    return min(n - 1, 2 * math.ceil(2 * math.log2(n)))


@dataclass(frozen=True)
class MaskSettings:
    """How masks are laid out (``he-mask-degree``, ``he-mask-threshold``).

    Parameters
    ----------
    degree : int (default: 0)
        Neighbours per institution; 0 is :func:`auto_degree`. Values of ``n - 1`` or more
        give the complete graph of Bonawitz et al.
    threshold : float (default: 0.5)
        Shares needed to rebuild a secret, as ``floor(threshold * (holders + 1)) + 1``;
        at least 0.5. At 0.5 twice the threshold exceeds ``holders + 1``: a server that
        tells some holders an institution survived and others that it dropped cannot
        rebuild both of its secrets, even with one colluding holder answering both
        (the honest holders answer one announcement each).
    """

    degree: int = 0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.degree < 0:
            raise MaskError(f"he-mask-degree={self.degree}: use 0 (automatic) or a positive "
                            "number of neighbours")
        if not 0.5 <= self.threshold < 1.0:
            raise MaskError(f"he-mask-threshold={self.threshold}: use a fraction in [0.5, 1) "
                            "(0.5: just over half of each institution's share holders)")

    def degree_for(self, n: int) -> int:
        d = auto_degree(n) if self.degree == 0 else min(self.degree, n - 1)
        return d if d >= n - 1 else d + (d % 2)  # a ring needs an even degree

    def needed(self, holders: int) -> int:
        """Shares needed out of ``holders``."""
        return min(holders, int(math.floor(self.threshold * (holders + 1))) + 1)

    def to_dict(self) -> dict:
        return {"degree": self.degree, "threshold": self.threshold}


def graph(members: Iterable[int], degree: int, seed: str) -> dict[int, tuple[int, ...]]:
    """Each member's neighbours: a ring in an order drawn from ``seed`` (the run id),
    each linked to the ``degree // 2`` nearest on each side; complete when
    ``degree >= n - 1``. Deterministic: every party computes the same graph."""
    members = sorted({int(m) for m in members})
    n = len(members)
    if degree >= n - 1:
        return {u: tuple(v for v in members if v != u) for u in members}
    order = sorted(members, key=lambda m: hashlib.sha256(f"{seed}|{m}".encode()).digest())
    half = max(1, degree // 2)
    out: dict[int, set[int]] = {u: set() for u in members}
    for i, u in enumerate(order):
        for j in range(1, half + 1):
            v = order[(i + j) % n]
            out[u].add(v)
            out[v].add(u)
    return {u: tuple(sorted(vs)) for u, vs in out.items()}


def holders(neighbours: Mapping[int, Sequence[int]], u: int,
            among: Iterable[int] | None = None) -> tuple[int, ...]:
    """Who holds shares of ``u``'s secrets: its neighbours (within ``among``) and itself."""
    ns = set(neighbours[u]) | {u}
    if among is not None:
        ns &= set(among) | {u}
    return tuple(sorted(ns))


# ----------------------------------------------------------------------- keys
def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes ``(private, public)``."""
    priv = X25519PrivateKey.generate()
    return (priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                               serialization.NoEncryption()),
            public_of(priv))


def public_of(priv: X25519PrivateKey | bytes) -> bytes:
    if isinstance(priv, bytes):
        priv = _private(priv)
    return priv.public_key().public_bytes(serialization.Encoding.Raw,
                                          serialization.PublicFormat.Raw)


def _private(raw: bytes) -> X25519PrivateKey:
    try:
        return X25519PrivateKey.from_private_bytes(bytes(raw))
    except ValueError:
        raise MaskError("not a 32-byte X25519 private key") from None


def agree(priv: bytes, peer_public: bytes) -> bytes:
    """The X25519 shared secret of ``priv`` and ``peer_public`` (a low-order public key
    that would give a known secret is refused)."""
    try:
        shared = _private(priv).exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError as err:
        raise MaskError(f"refused public key ({err}): not a valid X25519 key") from None
    return shared


def _hkdf(secret: bytes, info: str, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=f"{_LABEL}|{info}".encode()).derive(secret)


def pair_seed(shared: bytes, run: str, epoch: int, u: int, v: int) -> bytes:
    a, b = sorted((int(u), int(v)))
    return _hkdf(shared, f"pair|{run}|{int(epoch)}|{a}|{b}")


def self_seed(b: bytes, run: str, epoch: int, u: int) -> bytes:
    return _hkdf(b, f"self|{run}|{int(epoch)}|{int(u)}")


def commit_self(b: bytes, run: str, epoch: int, u: int) -> str:
    """The commitment to ``b_u`` that ``u``'s signed update carries (hex SHA-256)."""
    return hashlib.sha256(f"{_LABEL}|commit|{run}|{int(epoch)}|{int(u)}|".encode()
                          + bytes(b)).hexdigest()


def key_digest(public: bytes) -> str:
    """A short hash of a public key (what an update's signed meta names as the epoch key
    it was masked with)."""
    return hashlib.sha256(b"fedface/masks/key|" + bytes(public)).hexdigest()[:32]


def advert_message(kind: str, run: str, sender: int, epoch: int, public: bytes) -> bytes:
    """The bytes an institution signs to advertise a public key: its run key
    (``kind="run"``, epoch 0) or an epoch key."""
    return json.dumps({"purpose": "fedface-mask-key", "kind": kind, "run": run,
                       "sender": int(sender), "epoch": int(epoch),
                       "public": bytes(public).hex()}, sort_keys=True).encode()


# ----------------------------------------------------------------------- the PRG
def expand(seed: bytes, count: int, modulus: int) -> np.ndarray:
    """``count`` values uniform in ``[0, modulus)`` (uint64) from a 32-byte ``seed``:
    AES-256-CTR keystream, rejection sampling on ``bit_length(modulus)`` bits."""
    if count <= 0:
        return np.zeros(0, np.uint64)
    bits = int(modulus).bit_length()
    if bits > 62:
        raise MaskError(f"plaintext modulus of {bits} bits: masks support up to 62")
    enc = Cipher(algorithms.AES(bytes(seed)), modes.CTR(b"\0" * 16)).encryptor()
    lo = np.uint64((1 << bits) - 1)
    out, have = np.empty(count, np.uint64), 0
    while have < count:
        want = count - have
        draw = want + want // 16 + 64  # t is close to 2^bits: few values are rejected
        raw = np.frombuffer(enc.update(b"\0" * (8 * draw)), dtype=np.uint64) & lo
        keep = raw[raw < np.uint64(modulus)][:want]
        out[have:have + keep.size] = keep
        have += keep.size
    return out


def add_mod(a: np.ndarray, b: np.ndarray, t: int) -> np.ndarray:
    s = a + b
    return np.where(s >= np.uint64(t), s - np.uint64(t), s)


def sub_mod(a: np.ndarray, b: np.ndarray, t: int) -> np.ndarray:
    return np.where(a >= b, a - b, a + (np.uint64(t) - b))


def pair_contribution(u: int, v: int, seed: bytes, count: int, t: int) -> np.ndarray:
    """What ``u`` adds for its pair with ``v``: ``+PRG`` if ``u < v``, else ``-PRG``
    (``t - PRG``, modulo ``t``)."""
    r = expand(seed, count, t)
    return r if int(u) < int(v) else sub_mod(np.zeros_like(r), r, t)


class _Sum:
    """A running sum of values below ``t``, reduced modulo ``t`` only when it could
    overflow 64 bits and at the end (one pass instead of one per term)."""

    def __init__(self, count: int, t: int) -> None:
        self.t, self.total, self.terms = int(t), np.zeros(count, np.uint64), 0
        self.room = (1 << 63) // max(self.t, 1)  # terms that fit before a reduction

    def add(self, values: np.ndarray) -> None:
        if self.terms + 1 >= self.room:
            self.total %= np.uint64(self.t)
            self.terms = 1
        self.total += values
        self.terms += 1

    def value(self) -> np.ndarray:
        return self.total % np.uint64(self.t)


def mask_of(u: int, b: bytes, epoch_private: bytes, peers: Mapping[int, bytes], *,
            run: str, epoch: int, count: int, t: int) -> np.ndarray:
    """Institution ``u``'s mask: its self mask plus a pairwise mask with each of
    ``peers`` (neighbour -> its epoch public key)."""
    m = _Sum(count, t)
    m.add(expand(self_seed(b, run, epoch, u), count, t))
    for v, pub in sorted(peers.items()):
        if int(v) == int(u):
            continue
        seed = pair_seed(agree(epoch_private, pub), run, epoch, u, v)
        m.add(pair_contribution(u, v, seed, count, t))
    return m.value()


def correction(self_secrets: Mapping[int, bytes], dropped_keys: Mapping[int, bytes],
               epoch_publics: Mapping[int, bytes], neighbours: Mapping[int, Sequence[int]],
               survivors: Iterable[int], *, run: str, epoch: int, count: int,
               t: int) -> np.ndarray:
    """What remains of the masks in the survivors' sum, to subtract from it: their self
    masks (``self_secrets``: survivor -> ``b``) and, for each dropped institution
    (``dropped_keys``: dropped -> its epoch private key), the pairwise masks its
    surviving neighbours added for it."""
    survivors = {int(s) for s in survivors}
    total = _Sum(count, t)
    for u in sorted(survivors):
        total.add(expand(self_seed(self_secrets[u], run, epoch, u), count, t))
    for d, priv in sorted(dropped_keys.items()):
        for u in sorted(set(neighbours[d]) & survivors):
            seed = pair_seed(agree(priv, epoch_publics[u]), run, epoch, u, d)
            total.add(pair_contribution(u, d, seed, count, t))
    return total.value()


# ----------------------------------------------------------------------- shares
def share_secret(secret: bytes, holder_ids: Sequence[int], needed: int) -> dict[int, bytes]:
    """Shamir shares of ``secret``, one per holder (Flower's helpers): ``needed`` of
    them rebuild it, fewer reveal nothing."""
    holder_ids = sorted(int(h) for h in holder_ids)
    if not 1 <= needed <= len(holder_ids):
        raise MaskError(f"threshold {needed} for {len(holder_ids)} holders")
    shares = create_shares(bytes(secret), needed, len(holder_ids))
    return dict(zip(holder_ids, shares))


def combine(shares: Sequence[bytes], needed: int, check=None, tries: int = 64) -> bytes:
    """The secret from ``needed`` distinct shares; :class:`MaskError` when they do not
    combine (fewer than needed, duplicated or malformed). With ``check`` (secret ->
    bool), subsets of the shares are tried (up to ``tries``) until one rebuilds a secret
    that passes it: one wrong share among more than ``needed`` does not stop the round."""
    shares = list(dict.fromkeys(bytes(s) for s in shares))
    if len(shares) < needed:
        raise MaskError(f"{len(shares)} distinct shares, {needed} needed")
    last = "they do not rebuild the committed secret"
    for subset in itertools.islice(_subsets(shares, needed), tries):
        try:
            secret = combine_shares(list(subset))
        except (ValueError, IndexError, TypeError) as err:
            last = f"the shares do not combine ({err})"
            continue
        if check is None or check(secret):
            return secret
    raise MaskError(last)


def _subsets(shares: list[bytes], needed: int):
    """Subsets of ``needed`` shares, those leaving out fewer shares first: one wrong share
    among ``k`` is passed over within ``k`` tries, whatever its place."""
    spare = len(shares) - needed
    for left_out in range(spare + 1):
        for out in itertools.combinations(range(len(shares)), left_out):
            rest = [s for i, s in enumerate(shares) if i not in out]
            yield tuple(rest[:needed])


def _share_key(own_private: bytes, peer_public: bytes, run: str, a: int, b: int) -> bytes:
    lo, hi = sorted((int(a), int(b)))
    return _hkdf(agree(own_private, peer_public), f"share-key|{run}|{lo}|{hi}")


def _aad(kind: str, run: str, epoch: int, owner: int, holder: int) -> bytes:
    return json.dumps({"kind": kind, "run": run, "epoch": int(epoch), "owner": int(owner),
                       "holder": int(holder)}, sort_keys=True).encode()


def seal_share(share: bytes, *, own_run_private: bytes, holder_run_public: bytes, kind: str,
               run: str, epoch: int, owner: int, holder: int) -> bytes:
    """``share`` encrypted to ``holder`` (AES-256-GCM, nonce first), bound to run,
    epoch, kind, owner and holder."""
    key = _share_key(own_run_private, holder_run_public, run, owner, holder)
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, bytes(share), _aad(kind, run, epoch, owner, holder))


def open_share(blob: bytes, *, own_run_private: bytes, owner_run_public: bytes, kind: str,
               run: str, epoch: int, owner: int, holder: int) -> bytes:
    """The share ``owner`` sealed for ``holder``; :class:`MaskError` when it does not
    verify (tampered, another run, epoch, kind, owner or holder)."""
    key = _share_key(own_run_private, owner_run_public, run, owner, holder)
    blob = bytes(blob)
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], _aad(kind, run, epoch, owner, holder))
    except (InvalidTag, ValueError):
        raise MaskError(f"the {kind} share of institution {owner} for institution {holder} "
                        f"(epoch {epoch}) does not verify: tampered, or of another run or "
                        "epoch") from None


# ----------------------------------------------------------------------- on the wire
def pack_doc(doc: dict) -> ConfigRecord:
    """A mask message as a Flower ConfigRecord (JSON; bytes as hex)."""
    return ConfigRecord({DOC: json.dumps(doc, sort_keys=True).encode()})


def mask_bytes(content) -> int:
    """Bytes of the mask messages a Flower message carries (its :func:`pack_doc` records)."""
    return sum(len(rec[DOC]) for rec in content.config_records.values()
               if DOC in rec and isinstance(rec[DOC], bytes))


def unpack_doc(record: ConfigRecord | None, what: str) -> dict:
    """The mask message of :func:`pack_doc`; :class:`MaskError` naming ``what`` when it
    is missing or malformed."""
    if record is None or DOC not in record:
        raise MaskError(f"the message lacks its {what}")
    try:
        doc = json.loads(bytes(record[DOC]))
    except (ValueError, TypeError):
        raise MaskError(f"the {what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise MaskError(f"the {what} is not a mask message")
    return doc
