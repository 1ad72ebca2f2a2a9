"""Encrypted face-template matching: CKKS over TenSEAL's SEAL bindings (issue 14).

Enrolled face embeddings (L2-normalised float vectors, 128-d or 512-d; score = cosine =
dot product) are stored encrypted. A matching server computes encrypted scores from
encrypted templates and an encrypted probe; only the key holder decrypts, and what he
decrypts is the SCORE, never a template.

Who sees what (the adversaries)
-------------------------------
- **The matching server and the database** (``public/`` folder: public key, the
  evaluation keys of the 1:N fold, parameters) see ciphertexts, the template ids, which
  slots are live or revoked, and which template (1:1) or gallery (1:N) a probe is
  matched against. They cannot
  decrypt anything (CKKS, RLWE at 128-bit security). Integrity is not provided here: a
  database that flips ciphertext bits makes wrong scores; sign the blobs if that matters.
- **The key holder** (``secret/`` folder) receives only score ciphertexts. Decrypting a
  score ciphertext gives him the whole plaintext polynomial, not just the slots a
  helper decodes, so the server hides everything else in it:

  * 1:1: the product of the tiled template and probe leaves the element-wise products
    (from which, knowing his probe, he could rebuild the template) in every slot; the
    score is their mean, i.e. the polynomial's constant coefficient. The server adds a
    mask whose constant coefficient is tiny and whose other coefficients are Gaussian of
    std ``2**mask_bits`` (cross terms are at most 1), so only the score survives.
  * 1:N: revoked and empty slots get Gaussian noise of std ``2**mask_bits`` (a revoked
    template's score is at most 1 in magnitude), so their scores are never decrypted.
  * Noise flooding: every score gets Gaussian noise of std ``2**-flood_bits``. CKKS
    decryption is approximate, and part of its error is a function of the templates
    (Li and Micciancio 2021): measured about 2**-37 for fresh ciphertexts, growing with
    the square root of the number of enrolment batches added to a block. The flood is
    2**23 times larger (2**17 after 4,096 batches of one template). The one rescale of
    the size-3 product adds about 2**-19 of rounding, a function of the ciphertexts'
    uniformly random parts only.

  What remains is inherent to returning scores: he learns the score of his probe against
  every live template he is sent, and a key holder who submits ``d`` chosen probes (the
  basis vectors) learns every enrolled template from the scores alone. Limit and audit
  queries outside this module; no cryptography here prevents it.
- **The network** carries ciphertexts only (probe and score ciphertexts, enrolment
  batches); it learns sizes and timing.

Layout
------
1:1 (:func:`encrypt_template`, :func:`score_1to1`): template and probe are each one
ciphertext holding the vector tiled over the slots (``slots // d`` copies, scaled so the
mean of the slot-wise product is the dot product). The server multiplies them (no
relinearization: the key holder decrypts the size-3 result), rescales once and adds the
mask above. The score is the mean of the decoded slots (the constant coefficient), so no
rotation and no Galois key is needed, where a rotate-and-sum would cost log2(d) key
switches (about 5 ms at this ring).

1:N (:class:`Gallery`): Boddeti 2018's column packing, folded. With ``fold = 1`` a block
holds ``slots`` templates, its column ``j`` is one ciphertext holding dimension ``j`` of
every template of the block (slot k = template k), and the probe is ``d`` ciphertexts,
``j`` holding ``p_j`` in every slot. With ``fold = f`` a column holds ``f`` dimensions in
``f`` slot segments of ``slots / f`` templates each (slot ``i * slots/f + k``: dimension
``j*f + i`` of template ``k``), the probe is ``d / f`` ciphertexts (segment ``i`` of
ciphertext ``j`` holding ``p_{j*f+i}``), and after the products are summed the segments
are added up by ``log2(f)`` rotations (steps slots/2, slots/4, ...), which leaves every
template's full score in each segment: no partial sum is ever decryptable. Score
ciphertext of a block = ``sum_j column_j * probe_j``: d/f multiplications without
relinearization, additions of size-3 ciphertexts, one rescale, (f > 1) one
relinearization and log2(f) rotations, one masked-noise plaintext added. An enrolment
station (public key only) encrypts a batch of templates as ``d / f`` ciphertexts holding
them in the free slots it is given (zeros elsewhere), and the server adds them to the
block's columns: ``d / f`` encryptions per batch, however large.

Measured at 10,000 templates (d=128; median of 3 searches on the 2 shared cores, load
3.5 to 4.3): fold 1: search 22 us per match, 45 us with the key holder's probe
encryption and decryption, probe 16.8 MB; fold 2: 15 / 31 us, 8.4 MB; **fold 4: 18 /
27 us, 4.2 MB**; fold 8: 23 / 30 us, 2.1 MB; fold 16: 37 / 42 us, 1.1 MB. Fold 4 is the
default: the probe a quarter of Boddeti's, blocks of 1024 (10,000 templates waste 2 %
of the slots, against 19 % in blocks of 4096), and a public bundle of 2.75 MB
(public key, relinearization keys, two Galois keys) against 0.39 MB at fold 1.

Parameters (:class:`MatchParams`)
---------------------------------
Ring 8192 (4096 slots), coefficient primes 60 + 60 + 60 bits (180 of the 218 that
HomomorphicEncryption.org allows at 128-bit security for this ring), templates and
probes at scale 2**50. A product has scale 2**100 in the 120-bit level (headroom 2**19),
the one rescale divides by the 60-bit q1, leaving scores at scale 2**40 in the 60-bit q0
(headroom 2**19 for the masks of std 2**15). The third prime is SEAL's special prime
(key switching: the fold's relinearization and rotations). Why this and not others
(measured on the 2-core development machine):

- Ring 4096 allows 109 bits: the scale could not exceed ~2**35, CKKS's own error would be
  ~2**-22 and flooding it 2**20 times over would break the 1e-3 score accuracy (the tests
  use such a ring only to check that the parameters are free).
- A multiplication costs in proportion to the primes it runs over: 0.23 ms for 4096
  slots at two primes against 0.36 ms at three. A 0/1 multiplicative mask for revoked
  slots would need a third data prime for every multiplication of every search (+50 %);
  additive noise needs none.
- BFV on quantized embeddings: one ciphertext multiplication at ring 8192 costs 7.7 ms
  for 8192 slots against 0.23 ms for 4096 CKKS slots (about 17x more per score), and
  needs ~30-bit plaintexts for 1e-3 accuracy. CKKS wins.
- Threads: SEAL's Python binding does not release the GIL (64 multiply-adds: 26 ms on one
  thread, 28 ms on two), so everything here is single-threaded; run one matching process
  per core over disjoint blocks to use more cores.

Measured (``fedface.templates.he_bench.benchmark()``, d=128, fold 4, 2 cores shared
with other jobs, load 3.9): 1:1 3.2 ms per match server-side (target 10 ms), 5.9 ms with
the key holder's probe encryption (1.9 ms) and decryption (0.8 ms). 1:N at 10,000
templates: 15.5 us per match, search only (target 50 us), 26 us with the key holder's
probe encryption (0.06 to 0.11 s) and decryption (10 ms); plaintext numpy on one thread
0.018 us. At 1,000 templates the search is 32 us per match: loading the probe's 32
seeded ciphertexts (~20 ms, expanding their seeds) is then half of it. Max |score error|
2.5e-4 (target 1e-3). 1:1 template 262 kB, 1:1 probe 131 kB, 1:1 score 197 kB; gallery
8.4 kB per template; 1:N probe 4.2 MB, scores 143 kB per 1,024 templates; enrolment
7,000 templates/s in batches, 7/s one at a time (d/fold encryptions each).

Serialization
-------------
Every blob (template, probe, query, enrolment batch, gallery block, scores) is
``FFHM | version | kind | key id (8 bytes) | metadata (JSON) | SEAL ciphertexts``; SEAL
compresses each ciphertext with zstd (its default; 60-bit coefficients barely shrink).
Ciphertexts the key holder encrypts (probes) are saved seeded: half the size. A blob
made under another key id, of another kind, or whose ciphertexts do not parse under these
parameters is refused, saying which. A ciphertext of another key under the same
parameters parses: the key id in the blob is what refuses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal

from crypto.context import BadCiphertext, MissingSecretKey
from crypto.keyfile import read_private, write_private
from crypto.keys import KeyBundleError


def _read_private(path: Path, what: str) -> bytes:
    return read_private(path, what, KeyBundleError,
                        missing="make the keys with `fedface keys match --out DIR` and pass DIR "
                        "(or its public/ or secret/ folder)")


_write_private = write_private

PUBLIC_DIR = "public"
SECRET_DIR = "secret"
BUNDLE_FILE = "bundle.json"
PUBLIC_KEY_FILE = "public.key"
SECRET_KEY_FILE = "secret.key"
RELIN_KEY_FILE = "relin.key"
GALOIS_KEY_FILE = "galois.key"
STORE_KEY_FILE = "store.key"  # the template store's integrity-tag key, in both folders

_MAGIC = b"FFHM"
_VERSION = 1
_KINDS = {"template": 1, "probe": 2, "query": 3, "batch": 4, "block": 5, "score": 6, "scores": 7}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}
_WHAT = {"template": "1:1 enrolled template (encrypt_template)",
         "probe": "1:1 probe (encrypt_probe(..., mode='1:1'))",
         "query": "1:N probe (encrypt_probe(..., mode='1:N'))",
         "batch": "enrolment batch (encrypt_batch)",
         "block": "gallery block (Gallery.to_bytes)",
         "score": "1:1 score (score_1to1; decrypt_score)",
         "scores": "1:N scores (Gallery.search; decrypt_scores)"}
_HEADER = struct.Struct("<4sBB8sI")  # magic, version, kind, key id, metadata length
_LEN = struct.Struct("<I")


class KeyIdMismatch(BadCiphertext):
    """A blob encrypted under other keys than the ones it is used with."""


@dataclass(frozen=True)
class MatchParams:
    """CKKS parameters fixed by the matching key ceremony.

    Parameters
    ----------
    poly_modulus_degree : int (default: 8192)
        Ring dimension N; a ciphertext has N/2 slots (a gallery block's templates).
    coeff_bits : tuple of three ints (default: (60, 60, 60))
        Bits of the primes q0, q1 and SEAL's special prime q2. Templates and probes live
        at q0*q1; the one rescale divides by q1; scores are decrypted at q0. Their sum
        may not exceed HomomorphicEncryption.org's 128-bit bound (218 bits at N=8192).
    scale_bits : int (default: 50)
        Templates and probes are encoded at scale 2**scale_bits; scores end at scale
        2**(2*scale_bits - q1 bits) (``out_bits``).
    flood_bits : int (default: 14)
        Every decrypted score carries Gaussian noise of std 2**-flood_bits (6.1e-5):
        it hides CKKS's template-dependent error and stays far below 1e-3.
    fold : int (default: 4)
        1:N layout: a gallery column ciphertext holds ``fold`` dimensions (in ``fold``
        slot segments) of ``slots // fold`` templates, so a 1:N probe is ``d / fold``
        ciphertexts; a block's score costs one relinearization and ``log2(fold)``
        rotations (Galois keys for those steps only). 1: Boddeti's layout, no
        evaluation keys at all.
    """

    scheme: str = "ckks"
    poly_modulus_degree: int = 8192
    coeff_bits: tuple[int, ...] = (60, 60, 60)
    scale_bits: int = 50
    flood_bits: int = 14
    fold: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_bits", tuple(int(b) for b in self.coeff_bits))
        if self.scheme != "ckks":
            raise ValueError(f"scheme {self.scheme!r}: encrypted matching uses CKKS (BFV on quantized "
                             "embeddings measured ~17x slower per score)")
        n = self.poly_modulus_degree
        if n not in (4096, 8192, 16384):
            raise ValueError(f"poly_modulus_degree={n}: use 8192 (or 4096, 16384)")
        if len(self.coeff_bits) != 3 or not all(20 <= b <= 60 for b in self.coeff_bits):
            raise ValueError(f"coeff_bits={self.coeff_bits}: give three primes of 20 to 60 bits "
                             "(q0: the scores' level, q1: divided away by the rescale, q2: SEAL's "
                             "special prime), e.g. (60, 60, 60)")
        limit = seal.CoeffModulus.MaxBitCount(n, seal.SEC_LEVEL_TYPE.TC128)
        if sum(self.coeff_bits) > limit:
            raise ValueError(f"coeff_bits={self.coeff_bits} sum to {sum(self.coeff_bits)} bits, over "
                             f"the {limit} bits that keep ring {n} at 128-bit security: use smaller "
                             "primes or a larger ring")
        q0, q1, _ = self.coeff_bits
        if 2 * self.scale_bits + 8 > q0 + q1:
            raise ValueError(f"scale_bits={self.scale_bits}: a product (scale 2**{2 * self.scale_bits})"
                             f" must fit in q0*q1 ({q0 + q1} bits) with 8 bits to spare: lower "
                             "scale_bits or enlarge q0, q1")
        if self.out_bits < self.flood_bits + 16:
            raise ValueError(f"scores would be left at scale 2**{self.out_bits}, too coarse for "
                             f"noise of 2**-{self.flood_bits}: raise scale_bits or lower q1's bits")
        if self.fold < 1 or self.fold & (self.fold - 1) or self.fold > 64:
            raise ValueError(f"fold={self.fold}: use a power of two from 1 to 64 (4 by default)")
        if self.mask_bits < 4:
            raise ValueError(f"scores at scale 2**{self.out_bits} leave no room in q0 ({q0} bits) for "
                             "the masks that hide everything but the scores: lower scale_bits or "
                             "raise q0's bits")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def capacity(self) -> int:
        """Templates per gallery block."""
        return self.slots // self.fold

    @property
    def rotation_steps(self) -> list[int]:
        """Rotations that fold a block's score: slots/2, slots/4, ..., slots/fold."""
        return [self.slots >> k for k in range(1, self.fold.bit_length())]

    @property
    def scale(self) -> float:
        return 2.0 ** self.scale_bits

    @property
    def out_bits(self) -> int:
        """Scores' scale after the rescale: 2**out_bits."""
        return 2 * self.scale_bits - self.coeff_bits[1]

    @property
    def mask_bits(self) -> int:
        """Masks have std 2**mask_bits: room in q0 for 8.6 sigma (Box-Muller's largest)."""
        return self.coeff_bits[0] - 1 - self.out_bits - 4

    def to_dict(self) -> dict:
        d = asdict(self)
        d["coeff_bits"] = list(self.coeff_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "the bundle") -> MatchParams:
        try:
            return cls(**d)
        except (TypeError, ValueError) as err:
            raise KeyBundleError(f"{where} holds unusable matching parameters ({err}): copy the "
                                 "folder again from the key ceremony") from None

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def match_key_id(params: MatchParams, public_key: bytes) -> str:
    """The key id: a hash of the parameters and the public key's bytes, 16 hex digits."""
    h = hashlib.sha256(f"fedface-match|{params.digest()}|".encode()
                       + hashlib.sha256(public_key).digest()).hexdigest()[:16]
    return ":".join(h[i:i + 4] for i in range(0, 16, 4))


def _gaussian(n: int, std: float) -> np.ndarray:
    """``n`` samples of N(0, std**2) from the operating system's CSPRNG (Box-Muller).

    The masks must be unpredictable to the key holder, who sees their sums with scores.
    """
    m = (n + 1) // 2
    u = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(2, m) >> np.uint64(11)
    u1 = (u[0].astype(np.float64) + 1.0) * 2.0 ** -53  # (0, 1]
    u2 = u[1].astype(np.float64) * (2.0 * math.pi * 2.0 ** -53)
    r = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([r * np.cos(u2), r * np.sin(u2)])[:n] * std


def _complex_gaussian(n: int, std: float) -> np.ndarray:
    """``n`` complex samples, real and imaginary parts each N(0, std**2)."""
    g = _gaussian(2 * n, std)
    return g[:n] + 1j * g[n:]


class MatchKeys:
    """SEAL objects for one matching key: public key always, secret key for the key holder.

    Build it with :func:`load_match_keys`. From ``public/`` (the matching server, an
    enrolment station) it encrypts with the public key and computes on ciphertexts (with
    the relinearization and Galois keys of the 1:N fold); from
    ``secret/`` (the key holder) it also encrypts probes with the secret key (seeded
    ciphertexts, half the size) and decrypts scores. Not thread-safe: one per thread.
    """

    def __init__(self, params: MatchParams, public_key: bytes, secret_key: bytes | None = None, *,
                 relin_keys: bytes | None = None, galois_keys: bytes | None = None,
                 where: str = "these keys") -> None:
        self.params = params
        self.key_id = match_key_id(params, public_key)
        self.store_key: bytes | None = None  # read by load_match_keys (the store's tag key)
        self.seal = _seal_context(params)
        self.encoder = seal.CKKSEncoder(self.seal)
        self.evaluator = seal.Evaluator(self.seal)
        self._first = self.seal.first_parms_id()
        self._last = self.seal.last_parms_id()
        self._tmp = tempfile.TemporaryDirectory(prefix="fedface-match-",
                                                dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self._public = seal.PublicKey()
        self._load_key(self._public, public_key, f"{where}: the public key")
        self._relin = self._galois = None
        if relin_keys is not None and galois_keys is not None:
            self._relin, self._galois = seal.RelinKeys(), seal.GaloisKeys()
            self._load_key(self._relin, relin_keys, f"{where}: the relinearization keys")
            self._load_key(self._galois, galois_keys, f"{where}: the Galois keys")
        self._secret = None
        if secret_key is None:
            self._encryptor = seal.Encryptor(self.seal, self._public)
            return
        self._secret = seal.SecretKey()
        self._load_key(self._secret, secret_key, f"{where}: the secret key")
        self._encryptor = seal.Encryptor(self.seal, self._public, self._secret)
        self._decryptor = seal.Decryptor(self.seal, self._secret)
        # The pair check: what the public key encrypts, this secret key must decrypt.
        probe = np.linspace(-1.0, 1.0, self.slots)
        pt = self._encode(probe)
        ct = seal.Ciphertext()
        self._encryptor.encrypt(pt, ct)
        if not np.allclose(self._decode(ct), probe, atol=1e-6):
            raise KeyBundleError(f"{where}: the secret key does not decrypt what the public key "
                                 f"(key id {self.key_id}) encrypts: the two come from different "
                                 "ceremonies; copy the key holder's folder again from one ceremony")

    def __deepcopy__(self, memo) -> MatchKeys:
        return self  # SEAL objects are not copyable; the keys hold no per-query state

    @property
    def has_secret(self) -> bool:
        return self._secret is not None

    @property
    def slots(self) -> int:
        return self.params.slots

    @property
    def capacity(self) -> int:
        """Templates per gallery block."""
        return self.params.capacity

    def __repr__(self) -> str:
        role = "key holder" if self.has_secret else "public"
        return f"MatchKeys(key_id={self.key_id!r}, {role}, N={self.params.poly_modulus_degree})"

    # --------------------------------------------------------------- SEAL plumbing
    def _path(self, name: str) -> str:
        return os.path.join(self._tmp.name, name)

    def _load_key(self, key, data: bytes, what: str) -> None:
        path = self._path("key")  # the folder is the context's own (0700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            key.load(self.seal, path)
        except (RuntimeError, ValueError) as err:
            raise KeyBundleError(f"{what} is not a key for these parameters ({err}): copy the "
                                 "folder again from the key ceremony") from None
        finally:
            os.unlink(path)

    def _need_secret(self, what: str) -> None:
        if self._secret is None:
            raise MissingSecretKey(f"cannot {what}: this folder holds no secret key, by design: send "
                                   "the score ciphertext to the key holder")

    def _need_evaluation_keys(self) -> None:
        if self.params.fold > 1 and self._galois is None:
            raise KeyBundleError("this 1:N search needs the relinearization and Galois keys of the "
                                 f"ceremony's {PUBLIC_DIR}/ folder (fold={self.params.fold}); these "
                                 "keys were loaded without them: load the public folder")

    def _columns(self, dim: int) -> int:
        """Ciphertexts per gallery block (and per 1:N probe) for embeddings of ``dim``."""
        return -(-dim // self.params.fold)

    def _encode(self, values: np.ndarray | float, parms_id=None, scale: float | None = None):
        pt = seal.Plaintext()
        scale = self.params.scale if scale is None else scale
        parms_id = self._first if parms_id is None else parms_id
        if np.ndim(values) == 0:
            self.encoder.encode(float(values), parms_id, scale, pt)  # a constant polynomial
        else:
            self.encoder.encode(np.asarray(values).tolist(), parms_id, scale, pt)
        return pt

    def _encrypt(self, values: np.ndarray | float) -> bytes:
        """Encrypt slot values (or one value in every slot) at the top level: seeded with
        the secret key where there is one, else with the public key."""
        pt = self._encode(values)
        path = self._path("enc.ct")
        if self._secret is not None:
            self._encryptor.encrypt_symmetric(pt).save(path)
        else:
            ct = seal.Ciphertext()
            self._encryptor.encrypt(pt, ct)
            ct.save(path)
        with open(path, "rb") as f:
            return f.read()

    def _dump(self, ct) -> bytes:
        path = self._path("dump.ct")
        ct.save(path)
        with open(path, "rb") as f:
            return f.read()

    def _load(self, blob: bytes, what: str, *, top: bool):
        """A ciphertext of this key's parameters: fresh (``top``: size 2, top level, scale
        2**scale_bits) or a score (last level)."""
        path = self._path("load.ct")
        with open(path, "wb") as f:
            f.write(blob)
        ct = seal.Ciphertext()
        try:
            ct.load(self.seal, path)
        except (RuntimeError, ValueError) as err:
            raise BadCiphertext(f"{what} is not a ciphertext under these parameters ({err}): it is "
                                "corrupted, or was made with other matching keys") from None
        if top:
            ok = (ct.size() == 2 and ct.parms_id() == self._first and ct.scale == self.params.scale)
        else:
            ok = ct.size() in (2, 3) and ct.parms_id() == self._last
        if not ok:
            raise BadCiphertext(f"{what} is a ciphertext of size {ct.size()}, scale 2**"
                                f"{math.log2(ct.scale):.1f} at another level than expected: it was "
                                "not made by this module's functions")
        return ct

    def _add_noise(self, ct, z: np.ndarray) -> None:
        """Add the slot values ``z`` (complex, in score units) to a score ciphertext."""
        pt = seal.Plaintext()
        self.encoder.encode(z.tolist(), ct.parms_id(), ct.scale, pt)
        self.evaluator.add_plain_inplace(ct, pt)

    def _decode(self, ct) -> np.ndarray:
        pt = seal.Plaintext()
        self._decryptor.decrypt(ct, pt)
        return np.asarray(self.encoder.decode_double(pt))

    # --------------------------------------------------------------- blobs
    def _pack(self, kind: str, meta: dict, cts: Sequence[bytes]) -> bytes:
        m = json.dumps(meta, separators=(",", ":")).encode()
        parts = [_HEADER.pack(_MAGIC, _VERSION, _KINDS[kind], _key_bytes(self.key_id), len(m)), m,
                 _LEN.pack(len(cts))]
        for c in cts:
            parts += [_LEN.pack(len(c)), c]
        return b"".join(parts)

    def _unpack(self, blob: bytes, kind: str) -> tuple[dict, list[bytes]]:
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TypeError(f"expected the bytes of a {_WHAT[kind]}, got {type(blob).__name__}")
        blob = bytes(blob)
        if len(blob) < _HEADER.size or blob[:4] != _MAGIC:
            raise BadCiphertext(f"not a fedface encrypted-matching blob (no {_MAGIC.decode()} "
                                f"header): expected a {_WHAT[kind]}")
        _, version, k, kid, mlen = _HEADER.unpack_from(blob)
        if version != _VERSION:
            raise BadCiphertext(f"blob format version {version}, this fedface reads version "
                                f"{_VERSION}: update fedface or re-encrypt")
        got = _KIND_NAMES.get(k)
        if got != kind:
            raise BadCiphertext(f"this blob is a {_WHAT.get(got, f'kind {k}')}, not a {_WHAT[kind]}")
        key_id = _key_str(kid)
        if key_id != self.key_id:
            todo = ("re-enrol it under the current keys" if kind in ("template", "batch", "block")
                    else "make it again under these keys")
            raise KeyIdMismatch(f"this {_WHAT[kind]} was encrypted under key id {key_id}, these "
                                f"keys are key id {self.key_id}: {todo}, or load the folder of key "
                                f"id {key_id}")
        try:
            pos = _HEADER.size
            meta = json.loads(blob[pos:pos + mlen])
            pos += mlen
            (n,) = _LEN.unpack_from(blob, pos)
            pos += _LEN.size
            cts = []
            for _ in range(n):
                (size,) = _LEN.unpack_from(blob, pos)
                pos += _LEN.size
                if pos + size > len(blob):
                    raise ValueError("truncated")
                cts.append(blob[pos:pos + size])
                pos += size
            if pos != len(blob) or not isinstance(meta, dict):
                raise ValueError("trailing bytes")
        except (ValueError, struct.error, UnicodeDecodeError):
            raise BadCiphertext(f"this {_WHAT[kind]} is truncated or corrupted: fetch it again "
                                "from where it was stored") from None
        return meta, cts


def _key_bytes(key_id: str) -> bytes:
    return bytes.fromhex(key_id.replace(":", ""))


def _key_str(raw: bytes) -> str:
    h = raw.hex()
    return ":".join(h[i:i + 4] for i in range(0, 16, 4))


def _seal_context(params: MatchParams):
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree,
                                                     list(params.coeff_bits)))
    ctx = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise ValueError(f"SEAL refuses {params}: {ctx.parameters_error_message()}")
    return ctx


# ------------------------------------------------------------------ the key ceremony
def init_match_keys(out: str | Path, params: MatchParams | None = None, *, force: bool = False) -> dict:
    """Make a matching key pair in ``out``; returns its public description.

    Writes ``out/public/`` (``public.key``, with ``fold > 1`` ``relin.key`` and
    ``galois.key`` for the 1:N fold's rotations only, ``bundle.json``: the matching
    server's and the enrolment stations' folder, no secret key) and ``out/secret/`` (``secret.key``, a copy
    of ``public.key``, ``bundle.json``: the key holder's folder). Files are owner-only
    (0600), folders 0700. The bundles carry the parameters and the key id that every
    encrypted template is tagged with.

    Parameters
    ----------
    out : path
        The ceremony folder (created).
    params : MatchParams, optional
        Defaults to ``MatchParams()`` (ring 8192, primes 60+60+60, scale 2**50).
    force : bool
        Replace keys already in ``out``. Templates encrypted under them can then no longer
        be matched: re-enrol.
    """
    out, params = Path(out), params or MatchParams()
    for role in (PUBLIC_DIR, SECRET_DIR):
        if os.path.lexists(out / role / BUNDLE_FILE) and not force:
            raise KeyBundleError(f"{out} already holds matching keys ({out / role / BUNDLE_FILE}): use "
                                 "another folder, or force=True to replace them (templates "
                                 "encrypted under the old keys must then be re-enrolled)")
    ctx = _seal_context(params)
    gen = seal.KeyGenerator(ctx)
    keys = {PUBLIC_KEY_FILE: seal.PublicKey(), SECRET_KEY_FILE: gen.secret_key()}
    gen.create_public_key(keys[PUBLIC_KEY_FILE])
    if params.fold > 1:
        keys[RELIN_KEY_FILE], keys[GALOIS_KEY_FILE] = seal.RelinKeys(), seal.GaloisKeys()
        gen.create_relin_keys(keys[RELIN_KEY_FILE])
        gen.create_galois_keys([pow(3, step, 2 * params.poly_modulus_degree)
                                for step in params.rotation_steps], keys[GALOIS_KEY_FILE])
    data = {}
    with tempfile.TemporaryDirectory(prefix="fedface-match-keygen-",
                                     dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        for name, key in keys.items():
            key.save(os.path.join(tmp, name))
            data[name] = Path(tmp, name).read_bytes()
    data[STORE_KEY_FILE] = secrets.token_bytes(32)
    key_id = match_key_id(params, data[PUBLIC_KEY_FILE])
    desc = {"purpose": "fedface encrypted template matching", "scheme": params.scheme,
            "params": params.to_dict(), "key_id": key_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    evaluation = {n: hashlib.sha256(data[n]).hexdigest() for n in (RELIN_KEY_FILE, GALOIS_KEY_FILE)
                  if n in data}
    if not out.exists():
        out.mkdir(parents=True, mode=0o700)
        os.chmod(out, 0o700)
    for role, names, extra in ((PUBLIC_DIR, [PUBLIC_KEY_FILE, STORE_KEY_FILE, *evaluation],
                                {"evaluation_keys": evaluation}),
                               (SECRET_DIR, [SECRET_KEY_FILE, PUBLIC_KEY_FILE, STORE_KEY_FILE], {})):
        d = out / role
        d.mkdir(mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        for name in names:
            _write_private(d / name, data[name])
        for stale in {RELIN_KEY_FILE, GALOIS_KEY_FILE} - set(names):  # a replaced fold > 1
            (d / stale).unlink(missing_ok=True)
        _write_private(d / BUNDLE_FILE, json.dumps({**desc, **extra, "role": role}, indent=1).encode())
    return {**desc, "public": str(out / PUBLIC_DIR), "secret": str(out / SECRET_DIR)}


def _read_bundle(folder: Path) -> dict:
    path = folder / BUNDLE_FILE
    if not os.path.lexists(path) and ((folder / PUBLIC_DIR).is_dir() or (folder / SECRET_DIR).is_dir()):
        raise KeyBundleError(f"{folder} is a matching key ceremony folder: the matching server and "
                             f"enrolment stations load {folder / PUBLIC_DIR}, the key holder "
                             f"{folder / SECRET_DIR}")
    raw = _read_private(path, "matching key bundle")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if (not isinstance(doc, dict) or doc.get("purpose") != "fedface encrypted template matching"
            or doc.get("role") not in (PUBLIC_DIR, SECRET_DIR) or not isinstance(doc.get("params"), dict)
            or not isinstance(doc.get("key_id"), str)):
        raise KeyBundleError(f"{path} is not a fedface matching key bundle (truncated, edited, or "
                             "another kind of key): copy the folder again from the key ceremony")
    return doc


def load_match_keys(folder: str | Path, *, public: str | Path | None = None) -> MatchKeys:
    """The keys in a ceremony's ``public/`` or ``secret/`` folder.

    Parameters
    ----------
    folder : path
        ``out/public`` (matching server, enrolment station: no secret key) or ``out/secret``
        (the key holder).
    public : path, optional
        A public folder the keys must belong to (the key holder checking the server's
        folder, or the reverse); a folder of another ceremony is refused.

    Raises
    ------
    KeyBundleError
        A missing, insecure (not owner-only) or edited file; a public key that does not
        match its bundle's key id; a secret key that is not the public key's pair; a
        secret key in a public folder; ``public`` of another ceremony.
    """
    folder = Path(folder)
    bundle = _read_bundle(folder)
    params = MatchParams.from_dict(bundle["params"], str(folder / BUNDLE_FILE))
    pk = _read_private(folder / PUBLIC_KEY_FILE, "matching public key")
    key_id = match_key_id(params, pk)
    if key_id != bundle["key_id"]:
        raise KeyBundleError(f"{folder / PUBLIC_KEY_FILE} does not match {folder / BUNDLE_FILE} (key "
                             f"id {key_id}, the bundle says {bundle['key_id']}): copy the whole "
                             "folder again from one key ceremony")
    secret, evaluation = None, {}
    if bundle["role"] == SECRET_DIR:
        secret = _read_private(folder / SECRET_KEY_FILE, "matching secret key")
    elif os.path.lexists(folder / SECRET_KEY_FILE):
        raise KeyBundleError(f"{folder} is a public folder but holds {SECRET_KEY_FILE}: remove it "
                             "(the matching server must never hold the secret key)")
    else:
        digests = bundle.get("evaluation_keys") or {}
        for name in (RELIN_KEY_FILE, GALOIS_KEY_FILE) if params.fold > 1 else ():
            evaluation[name] = _read_private(folder / name, "matching evaluation key")
            if hashlib.sha256(evaluation[name]).hexdigest() != digests.get(name):
                raise KeyBundleError(f"{folder / name} is not the one {folder / BUNDLE_FILE} was made "
                                     "with (edited, or from another ceremony): copy the whole folder "
                                     "again from one key ceremony")
    keys = MatchKeys(params, pk, secret, relin_keys=evaluation.get(RELIN_KEY_FILE),
                     galois_keys=evaluation.get(GALOIS_KEY_FILE), where=str(folder))
    if os.path.lexists(folder / STORE_KEY_FILE):
        keys.store_key = _read_private(folder / STORE_KEY_FILE, "template store key")
        if len(keys.store_key) != 32:
            raise KeyBundleError(f"{folder / STORE_KEY_FILE} does not hold 32 bytes (truncated or "
                                 "edited): copy the folder again from the key ceremony")
    if public is not None:
        other = load_match_keys(public)
        if other.key_id != keys.key_id:
            raise KeyBundleError(f"{folder} holds the keys of key id {keys.key_id}, {public} is key id "
                                 f"{other.key_id}: the key holder and the matching server must use "
                                 "the folders of one ceremony")
    return keys


# ------------------------------------------------------------------ embeddings
def _embeddings(x, slots: int, what: str) -> np.ndarray:
    """Rows of L2-normalised embeddings (n, d), float64, checked."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"{what}: expected embeddings of shape (d,) or (n, d), got {np.shape(x)}")
    if a.shape[1] > slots:
        raise ValueError(f"{what}: dimension {a.shape[1]} exceeds the {slots} slots of these keys")
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: embeddings hold NaN or infinite values")
    norms = np.linalg.norm(a, axis=1)
    if (norms > 1.01).any():
        raise ValueError(f"{what}: an embedding has norm {norms.max():.3g}: L2-normalise embeddings "
                         "(x / ||x||) before encrypting; scores are cosine similarities")
    return a


def _tile(keys: MatchKeys, x: np.ndarray) -> np.ndarray:
    """``x`` repeated over the slots, scaled so the slot mean of a product is the dot product."""
    s, d = keys.slots, len(x)
    copies = s // d
    v = np.zeros(s)
    v[:copies * d] = np.tile(x, copies) * math.sqrt(s / copies)
    return v


# ------------------------------------------------------------------ 1:1
def encrypt_template(keys: MatchKeys, embedding) -> bytes:
    """Encrypt one enrolled template for 1:1 matching (enrolment station: public key).

    Parameters
    ----------
    keys : MatchKeys
        Public (or key holder's) keys.
    embedding : array of shape (d,)
        L2-normalised.

    Returns
    -------
    bytes
        The template blob (one ciphertext, tagged with ``keys.key_id``) for the database.
    """
    x = _embeddings(embedding, keys.slots, "encrypt_template")
    if len(x) != 1:
        raise ValueError("encrypt_template takes one embedding; for a gallery use Gallery.enroll")
    return keys._pack("template", {"dim": x.shape[1]}, [keys._encrypt(_tile(keys, x[0]))])


def encrypt_probe(keys: MatchKeys, embedding, mode: str = "1:1") -> bytes:
    """Encrypt a probe (the key holder, or a capture device with the public key).

    Parameters
    ----------
    keys : MatchKeys
        The key holder's keys (seeded ciphertexts, half the size) or public keys.
    embedding : array of shape (d,)
        L2-normalised.
    mode : {"1:1", "1:N"}
        "1:1": one ciphertext for :func:`score_1to1`; "1:N": ``d`` ciphertexts (``p_j`` in
        every slot) for :meth:`Gallery.search`.
    """
    p = _embeddings(embedding, keys.slots, "encrypt_probe")
    if len(p) != 1:
        raise ValueError("encrypt_probe takes one embedding")
    p = p[0]
    if mode == "1:1":
        return keys._pack("probe", {"dim": len(p)}, [keys._encrypt(_tile(keys, p))])
    if mode == "1:N":
        f, cols = keys.params.fold, keys._columns(len(p))
        if f == 1:  # p_j in every slot: a constant polynomial, nothing to encode
            return keys._pack("query", {"dim": len(p)}, [keys._encrypt(float(v)) for v in p])
        padded = np.zeros(cols * f)
        padded[:len(p)] = p
        # ciphertext j: segment i (slots i*capacity ...) holds p[j*fold + i]
        return keys._pack("query", {"dim": len(p)},
                          [keys._encrypt(np.repeat(padded[j * f:(j + 1) * f], keys.capacity))
                           for j in range(cols)])
    raise ValueError(f"mode={mode!r}: use '1:1' (against one template) or '1:N' (a gallery search)")


def score_1to1(keys: MatchKeys, template: bytes, probe: bytes) -> bytes:
    """The encrypted score of a 1:1 probe against an enrolled template (the server).

    Multiplies the two ciphertexts, rescales once, and adds a mask that leaves only the
    score decryptable (see the module docstring). Public keys suffice.

    Returns
    -------
    bytes
        The score blob, for :func:`decrypt_score` at the key holder.
    """
    tmeta, tcts = keys._unpack(template, "template")
    pmeta, pcts = keys._unpack(probe, "probe")
    if tmeta.get("dim") != pmeta.get("dim") or len(tcts) != 1 or len(pcts) != 1:
        raise ValueError(f"the template has dimension {tmeta.get('dim')}, the probe "
                         f"{pmeta.get('dim')}: both must come from the same embedding model")
    t = keys._load(tcts[0], "the template", top=True)
    p = keys._load(pcts[0], "the probe", top=True)
    prod = seal.Ciphertext()
    keys.evaluator.multiply(t, p, prod)
    keys.evaluator.rescale_to_next_inplace(prod)
    # Coefficients of std 2**mask_bits everywhere (std s*sqrt(2/N) from slot parts of
    # std s), then the constant coefficient (the mean of the real parts) set to the flood.
    s = keys.slots
    z = _complex_gaussian(s, 2.0 ** keys.params.mask_bits * math.sqrt(s))
    z.real += _gaussian(1, 2.0 ** -keys.params.flood_bits)[0] - z.real.mean()
    keys._add_noise(prod, z)
    return keys._pack("score", {"dim": tmeta["dim"]}, [keys._dump(prod)])


def decrypt_score(keys: MatchKeys, score: bytes) -> float:
    """The 1:1 score (the key holder)."""
    keys._need_secret("decrypt a score")
    _, cts = keys._unpack(score, "score")
    if len(cts) != 1:
        raise BadCiphertext("a 1:1 score blob holds one ciphertext")
    return float(keys._decode(keys._load(cts[0], "the score", top=False)).mean())


# ------------------------------------------------------------------ 1:N
def encrypt_batch(keys: MatchKeys, embeddings, ids: Sequence[str], block: int,
                  slots: Sequence[int]) -> bytes:
    """Encrypt templates into given free slots of a gallery block (the enrolment station).

    ``d / fold`` ciphertexts whatever the batch size: column ``j``'s slot
    ``i * capacity + k`` holds dimension ``j * fold + i`` of the template in slot ``k``,
    zeros elsewhere; :meth:`Gallery.add` adds them to the block. Ask the gallery where
    they go with :meth:`Gallery.placements`.

    Parameters
    ----------
    keys : MatchKeys
        Public keys suffice.
    embeddings : array of shape (n, d)
        L2-normalised.
    ids : sequence of n str
        Template ids (what the key holder sees next to the scores).
    block : int
        The block index.
    slots : sequence of n int
        Free slots of that block.
    """
    e = _embeddings(embeddings, keys.slots, "encrypt_batch")
    ids, slots = [str(i) for i in ids], [int(s) for s in slots]
    if not (len(ids) == len(slots) == len(e)):
        raise ValueError(f"{len(e)} embeddings, {len(ids)} ids and {len(slots)} slots: give one id and "
                         "one slot per embedding")
    if len(set(slots)) != len(slots) or any(not 0 <= s < keys.capacity for s in slots):
        raise ValueError(f"slots must be distinct and in [0, {keys.capacity}): use Gallery.placements")
    f, n_cols, cap = keys.params.fold, keys._columns(e.shape[1]), keys.capacity
    padded = np.zeros((len(e), n_cols * f))
    padded[:, :e.shape[1]] = e
    cols = np.zeros((n_cols, keys.slots))
    at = np.asarray(slots)
    for i in range(f):
        cols[:, i * cap + at] = padded[:, i::f].T
    meta = {"block": int(block), "dim": e.shape[1], "ids": ids, "slots": slots}
    return keys._pack("batch", meta, [keys._encrypt(c) for c in cols])


class _Block:
    __slots__ = ("index", "columns", "live", "dead")

    def __init__(self, index: int) -> None:
        self.index = index
        self.columns: list | None = None  # d SEAL ciphertexts once a batch was added
        self.live: dict[str, int] = {}  # template id -> slot
        self.dead: set[int] = set()  # revoked slots: they keep their ciphertext contents

    def used(self) -> set[int]:
        return set(self.live.values()) | self.dead


class Gallery:
    """An encrypted gallery for 1:N search (the matching server: public keys suffice).

    Blocks of ``keys.capacity`` templates in Boddeti's column layout (folded), held as SEAL
    ciphertexts in memory; :meth:`to_bytes` / :meth:`from_bytes` for the database.
    Revoked slots stay dead (their ciphertext contents cannot be cleared without the
    template); re-enrol into fresh slots, and rebuild the gallery to compact it.

    Parameters
    ----------
    keys : MatchKeys
        Public keys.
    dim : int
        Embedding dimension of every template.
    """

    def __init__(self, keys: MatchKeys, dim: int) -> None:
        if not 1 <= int(dim) <= keys.slots:
            raise ValueError(f"dim={dim}: must be in [1, {keys.slots}]")
        keys._need_evaluation_keys()
        self.keys, self.dim = keys, int(dim)
        self._blocks: list[_Block] = []
        self._where: dict[str, tuple[int, int]] = {}  # template id -> (block, slot)

    def __len__(self) -> int:
        return len(self._where)

    @property
    def ids(self) -> list[str]:
        return list(self._where)

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    def placements(self, n: int) -> list[tuple[int, list[int]]]:
        """Where the next ``n`` templates go: ``[(block, slots), ...]`` (free slots first,
        then new blocks; dead slots are never reused)."""
        out, left = [], int(n)
        for b in self._blocks:
            if left <= 0:
                break
            used = b.used()
            free = [s for s in range(self.keys.capacity) if s not in used][:left]
            if free:
                out.append((b.index, free))
                left -= len(free)
        index = len(self._blocks)
        while left > 0:
            k = min(left, self.keys.capacity)
            out.append((index, list(range(k))))
            index, left = index + 1, left - k
        return out

    def _check_new_ids(self, ids: Sequence[str]) -> None:
        if len(set(ids)) != len(ids):
            raise ValueError("template ids must be distinct within a batch")
        taken = [i for i in ids if i in self._where]
        if taken:
            raise ValueError(f"template ids already in the gallery: {taken[:5]}: revoke them first, "
                             "or use new ids")

    def add(self, batch: bytes) -> None:
        """Add an enrolment batch (:func:`encrypt_batch`) homomorphically."""
        meta, cts = self.keys._unpack(batch, "batch")
        try:
            index, dim = int(meta["block"]), int(meta["dim"])
            ids, slots = [str(i) for i in meta["ids"]], [int(s) for s in meta["slots"]]
        except (KeyError, TypeError, ValueError):
            raise BadCiphertext("the enrolment batch's metadata is corrupted: encrypt it again") from None
        if dim != self.dim or len(cts) != self.keys._columns(dim) or len(ids) != len(slots):
            raise ValueError(f"the batch holds {len(cts)} columns of dimension {dim}; this gallery's "
                             f"templates have dimension {self.dim}")
        if not 0 <= index <= len(self._blocks):
            raise ValueError(f"the batch is for block {index}, the gallery has {len(self._blocks)}: "
                             "ask Gallery.placements where templates go")
        self._check_new_ids(ids)
        block = self._blocks[index] if index < len(self._blocks) else _Block(index)
        taken = sorted(set(slots) & block.used())
        if taken or len(set(slots)) != len(slots) or any(not 0 <= s < self.keys.capacity for s in slots):
            raise ValueError(f"slots {taken[:5] or slots[:5]} of block {index} are taken or invalid: ask "
                             "Gallery.placements for free slots and encrypt the batch again")
        cols = [self.keys._load(c, f"column {j} of the enrolment batch", top=True)
                for j, c in enumerate(cts)]
        if block.columns is None:
            block.columns = cols
        else:
            for acc, c in zip(block.columns, cols):
                self.keys.evaluator.add_inplace(acc, c)
        if index == len(self._blocks):
            self._blocks.append(block)
        for i, s in zip(ids, slots):
            block.live[i] = s
            self._where[i] = (index, s)

    def enroll(self, embeddings, ids: Sequence[str]) -> None:
        """Encrypt and add templates (enrolment station and server in one process)."""
        e = _embeddings(embeddings, self.keys.slots, "Gallery.enroll")
        ids = [str(i) for i in ids]
        if len(ids) != len(e):
            raise ValueError(f"{len(e)} embeddings but {len(ids)} ids")
        self._check_new_ids(ids)
        start = 0
        for index, slots in self.placements(len(ids)):
            stop = start + len(slots)
            self.add(encrypt_batch(self.keys, e[start:stop], ids[start:stop], index, slots))
            start = stop

    def revoke(self, template_id: str) -> None:
        """Mark a template's slot dead: searches hide its score under noise from now on."""
        try:
            index, slot = self._where.pop(str(template_id))
        except KeyError:
            raise ValueError(f"no template {template_id!r} in the gallery") from None
        block = self._blocks[index]
        del block.live[str(template_id)]
        block.dead.add(slot)

    def search(self, query: bytes) -> list[bytes]:
        """Encrypted scores of a 1:N probe (:func:`encrypt_probe` ``mode="1:N"``) against
        every live template: one blob per block, for :func:`decrypt_scores`."""
        keys, ev = self.keys, self.keys.evaluator
        meta, cts = keys._unpack(query, "query")
        if meta.get("dim") != self.dim or len(cts) != keys._columns(self.dim):
            raise ValueError(f"the probe has dimension {meta.get('dim')}, this gallery's templates "
                             f"{self.dim}: both must come from the same embedding model")
        probe = [keys._load(c, f"probe ciphertext {j}", top=True) for j, c in enumerate(cts)]
        flood, hide = 2.0 ** -keys.params.flood_bits, 2.0 ** keys.params.mask_bits
        out = []
        for block in self._blocks:
            if not block.live:
                continue
            acc, tmp = seal.Ciphertext(), seal.Ciphertext()
            ev.multiply(block.columns[0], probe[0], acc)
            for col, p in zip(block.columns[1:], probe[1:]):
                ev.multiply(col, p, tmp)
                ev.add_inplace(acc, tmp)
            ev.rescale_to_next_inplace(acc)
            if keys.params.fold > 1:  # sum the segments: every segment then holds the scores
                ev.relinearize_inplace(acc, keys._relin)
                for step in keys.params.rotation_steps:
                    ev.rotate_vector(acc, step, keys._galois, tmp)
                    ev.add_inplace(acc, tmp)
            z = _complex_gaussian(keys.slots, flood)
            hidden = np.ones(keys.capacity, bool)
            hidden[list(block.live.values())] = False
            hidden = np.tile(hidden, keys.params.fold)
            z[hidden] += _complex_gaussian(int(hidden.sum()), hide)
            keys._add_noise(acc, z)
            out.append(keys._pack("scores", {"block": block.index, "live": block.live},
                                  [keys._dump(acc)]))
        return out

    def to_bytes(self) -> list[bytes]:
        """One blob per block (columns, live ids, dead slots) for the database."""
        return [self.keys._pack("block", {"index": b.index, "dim": self.dim, "live": b.live,
                                          "dead": sorted(b.dead)},
                                [self.keys._dump(c) for c in b.columns])
                for b in self._blocks]

    @classmethod
    def from_bytes(cls, keys: MatchKeys, blocks: Sequence[bytes]) -> Gallery:
        """A gallery from :meth:`to_bytes`'s blobs (all of them, in order)."""
        gallery = None
        for pos, blob in enumerate(blocks):
            meta, cts = keys._unpack(blob, "block")
            try:
                index, dim = int(meta["index"]), int(meta["dim"])
                live = {str(k): int(v) for k, v in meta["live"].items()}
                dead = {int(s) for s in meta["dead"]}
            except (KeyError, TypeError, ValueError, AttributeError):
                raise BadCiphertext(f"gallery block {pos}'s metadata is corrupted") from None
            gallery = gallery or cls(keys, dim)
            if index != pos or dim != gallery.dim or len(cts) != keys._columns(dim):
                raise BadCiphertext(f"gallery block {pos} is block {index} of dimension {dim} with "
                                    f"{len(cts)} columns: pass every block of one gallery, in order")
            block = _Block(index)
            block.columns = [keys._load(c, f"column {j} of gallery block {index}", top=True)
                             for j, c in enumerate(cts)]
            block.live, block.dead = live, dead
            gallery._check_new_ids(list(live))
            gallery._blocks.append(block)
            gallery._where.update({i: (index, s) for i, s in live.items()})
        if gallery is None:
            raise ValueError("no gallery blocks given")
        return gallery


def _decrypt_slots(keys: MatchKeys, blob: bytes) -> tuple[dict, np.ndarray]:
    """A 1:N score blob's metadata and all its decoded slots (masked ones included)."""
    keys._need_secret("decrypt scores")
    meta, cts = keys._unpack(blob, "scores")
    if len(cts) != 1 or not isinstance(meta.get("live"), dict):
        raise BadCiphertext("a 1:N score blob holds one ciphertext and its live slots")
    return meta, keys._decode(keys._load(cts[0], f"the scores of block {meta.get('block')}", top=False))


def decrypt_scores(keys: MatchKeys, scores: Sequence[bytes]) -> dict[str, float]:
    """``{template id: score}`` of a 1:N search (the key holder); masked slots are left out."""
    out = {}
    for blob in scores:
        meta, values = _decrypt_slots(keys, blob)
        out.update({str(i): float(values[int(s)]) for i, s in meta["live"].items()})
    return out


def top_k(keys: MatchKeys, scores: Sequence[bytes], k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` best ``(template id, score)`` of a 1:N search, best first (the key holder)."""
    ranked = sorted(decrypt_scores(keys, scores).items(), key=lambda kv: kv[1], reverse=True)
    return ranked[:max(int(k), 0)]


__all__ = [
    "Gallery", "KeyIdMismatch", "MatchKeys", "MatchParams", "decrypt_score", "decrypt_scores",
    "encrypt_batch", "encrypt_probe", "encrypt_template", "init_match_keys", "load_match_keys",
    "match_key_id", "score_1to1", "top_k",
]
