"""BFV contexts over TenSEAL's SEAL bindings (``tenseal.sealapi``).

fedface only ever *adds* encrypted updates (and multiplies them by small plaintext
integers), so it needs neither relinearization nor Galois keys: a single 60-bit
ciphertext prime is enough, and institutions encrypt with the shared **secret** key
(symmetric BFV). SEAL then serializes a fresh ciphertext in seeded form, one
polynomial plus a 64-byte seed instead of two polynomials: an encrypted update costs
about the bytes of its float32 values (see :mod:`crypto.packing`). TenSEAL's
``BFVVector`` always serializes both polynomials, which is why this module uses the
SEAL layer underneath it.

The server builds an :class:`HEContext` from the parameters alone (no key at all): it
can load, add and scale ciphertexts and nothing else; :meth:`HEContext.decrypt` there
raises :class:`MissingSecretKey`.

Analytics queries use BFV asymmetrically: the querier makes a key pair per query
(:meth:`HEContext.fresh`) and hands out only :meth:`HEContext.public_key_bytes`; a site's
context built with ``public_key=`` encrypts to the querier (full, unseeded ciphertexts)
and can decrypt nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal


class MissingSecretKey(PermissionError):
    """Decryption (or encryption) was asked of a context that holds no secret key."""


class BadCiphertext(ValueError):
    """Bytes that are not a valid ciphertext under these parameters."""


@dataclass(frozen=True)
class HEParams:
    """BFV parameters fixed by the key ceremony.

    Parameters
    ----------
    poly_modulus_degree : int (default: 4096)
        Ring dimension n = slots per ciphertext (128-bit security with a 60-bit modulus).
    coeff_bits : int (default: 60)
        Size of the single ciphertext prime q.
    plain_bits : int (default: 40)
        Size of the batching prime t; a slot holds an integer below t. The gap
        ``coeff_bits - plain_bits`` is the noise budget: a fresh ciphertext keeps about
        15 bits, 16 additions use 4 and a multiplication by 16 another 4.
    """

    scheme: str = "bfv"
    poly_modulus_degree: int = 4096
    coeff_bits: int = 60
    plain_bits: int = 40

    def __post_init__(self) -> None:
        if self.scheme != "bfv":
            raise ValueError(f"HE scheme {self.scheme!r} is not supported: fedface aggregates "
                             "with BFV (exact integer sums of quantized updates)")
        if self.poly_modulus_degree not in (2048, 4096, 8192, 16384):
            raise ValueError(f"poly_modulus_degree={self.poly_modulus_degree}: use 4096 "
                             "(or 8192, 16384)")
        if not self.plain_bits + 12 <= self.coeff_bits <= 60:
            raise ValueError(f"coeff_bits={self.coeff_bits}, plain_bits={self.plain_bits}: need "
                             "plain_bits + 12 <= coeff_bits <= 60 for a usable noise budget")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree

    def to_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


class HEContext:
    """SEAL objects for one parameter set, with or without the secret key."""

    def __init__(self, params: HEParams, secret_key_path: str | Path | None = None, *,
                 secret_key: bytes | None = None, public_key: bytes | None = None) -> None:
        """``secret_key`` (bytes, as read and checked by :mod:`crypto.keys`) or
        ``secret_key_path``: a context that can encrypt and decrypt; ``public_key`` (bytes of
        :meth:`public_key_bytes`): one that can encrypt to its owner and nothing else
        (asymmetric BFV, the analytics querier's key); none: the server's."""
        self.params = params
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
        parms.set_poly_modulus_degree(params.poly_modulus_degree)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree,
                                                         [params.coeff_bits]))
        parms.set_plain_modulus(seal.PlainModulus.Batching(params.poly_modulus_degree,
                                                           params.plain_bits))
        self.seal = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not self.seal.parameters_set():
            raise ValueError(f"SEAL refuses {params}: {self.seal.parameters_error_message()}")
        self.plain_modulus = int(parms.plain_modulus().value())
        self.evaluator = seal.Evaluator(self.seal)
        self.encoder = seal.BatchEncoder(self.seal)
        self._tmp = tempfile.TemporaryDirectory(prefix="fedface-he-",
                                                dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self._secret = None
        self._public = None
        if public_key is not None:
            self._public = seal.PublicKey()
            path = self._path("public.key")
            with open(path, "wb") as f:
                f.write(bytes(public_key))
            try:
                self._public.load(self.seal, path)
            except (RuntimeError, ValueError) as err:
                raise BadCiphertext(f"not a public key for these parameters ({err}): the "
                                    "querier's key was damaged or made for other parameters"
                                    ) from None
            self._public_encryptor = seal.Encryptor(self.seal, self._public)
        if secret_key is not None:
            # SEAL loads from a path: the bytes already checked go through this context's
            # own owner-only folder (not the key file again, which could have changed).
            secret_key_path = self._path("secret.key")
            fd = os.open(secret_key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret_key)
        if secret_key_path is not None:
            self._secret = seal.SecretKey()
            try:
                self._secret.load(self.seal, str(secret_key_path))
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"{secret_key_path} is not a secret key for these parameters "
                                 f"({err}): use the client bundle of the same key ceremony") from None
            finally:
                if secret_key is not None:
                    os.unlink(secret_key_path)
            self._encryptor = seal.Encryptor(self.seal, self._secret)
            self._decryptor = seal.Decryptor(self.seal, self._secret)

    def __deepcopy__(self, memo) -> HEContext:
        return self  # SEAL objects are not copyable; a context holds no per-round state

    @classmethod
    def generate_secret_key(cls, params: HEParams, path: str | Path) -> None:
        """A fresh secret key for ``params`` written to ``path`` (the ceremony's step)."""
        ctx = cls(params)
        seal.KeyGenerator(ctx.seal).secret_key().save(str(path))

    @classmethod
    def fresh(cls, params: HEParams) -> HEContext:
        """A context with a secret key generated in memory and never written anywhere but
        this context's own owner-only folder (the analytics querier's key, one per query);
        :meth:`public_key_bytes` is what it hands out."""
        ctx = cls(params)
        keygen = seal.KeyGenerator(ctx.seal)
        ctx._secret = keygen.secret_key()
        ctx._encryptor = seal.Encryptor(ctx.seal, ctx._secret)
        ctx._decryptor = seal.Decryptor(ctx.seal, ctx._secret)
        ctx._public = seal.PublicKey()
        keygen.create_public_key(ctx._public)
        ctx._public_encryptor = seal.Encryptor(ctx.seal, ctx._public)
        return ctx

    def secret_key_bytes(self) -> bytes:
        """The secret key's bytes (to keep in an owner-only file: the querier's, for a query
        answered later)."""
        self._need_secret("export the secret key")
        path = self._path("secret.out")
        self._secret.save(path)
        try:
            with open(path, "rb") as f:
                return f.read()
        finally:
            os.unlink(path)

    def public_key_bytes(self) -> bytes:
        """The public key (what a site encrypts its reply with)."""
        if self._public is None:
            raise MissingSecretKey("this context holds no public key")
        path = self._path("public.out")
        self._public.save(path)
        with open(path, "rb") as f:
            return f.read()

    @property
    def has_secret_key(self) -> bool:
        return self._secret is not None

    def _need_secret(self, what: str) -> None:
        if self._secret is None:
            raise MissingSecretKey(
                f"cannot {what}: this context was built from the server bundle, which holds no "
                "secret key (by design, the server can only add ciphertexts)")

    # --------------------------------------------------------------- serialization
    def _path(self, name: str) -> str:
        return os.path.join(self._tmp.name, name)

    def encrypt(self, slots: np.ndarray) -> list[bytes]:
        """Encrypt rows of ``slots`` (uint64, shape (k, n), values < t): seeded ciphertexts
        under the secret key, or full ciphertexts under the public key when the context
        holds one (it then never uses a secret key it may also hold)."""
        if self._public is None:
            self._need_secret("encrypt")
        slots = np.asarray(slots, dtype=np.uint64)
        if slots.ndim != 2 or slots.shape[1] != self.params.slots:
            raise ValueError(f"slots of shape {slots.shape}: expected (k, {self.params.slots})")
        if slots.size and int(slots.max()) >= self.plain_modulus:
            raise ValueError("slot values must be below the plaintext modulus")
        out = []
        path = self._path("enc.ct")
        for row in slots:
            pt = seal.Plaintext()
            self.encoder.encode(row.tolist(), pt)
            if self._public is not None:
                ct = seal.Ciphertext()
                self._public_encryptor.encrypt(pt, ct)
                ct.save(path)
            else:
                self._encryptor.encrypt_symmetric(pt).save(path)
            with open(path, "rb") as f:
                out.append(f.read())
        return out

    def load(self, blob: bytes) -> seal.Ciphertext:
        """A ciphertext from bytes; anything else raises :class:`BadCiphertext`."""
        path = self._path("load.ct")
        with open(path, "wb") as f:
            f.write(blob)
        ct = seal.Ciphertext()
        try:
            ct.load(self.seal, path)
        except (RuntimeError, ValueError) as err:
            raise BadCiphertext(f"not a ciphertext under these parameters ({err})") from None
        if ct.size() != 2 or ct.poly_modulus_degree() != self.params.poly_modulus_degree:
            raise BadCiphertext(f"ciphertext of size {ct.size()} / degree "
                                f"{ct.poly_modulus_degree()} does not fit these parameters")
        return ct

    def dump(self, ct: seal.Ciphertext) -> bytes:
        path = self._path("dump.ct")
        ct.save(path)
        with open(path, "rb") as f:
            return f.read()

    # --------------------------------------------------------------- arithmetic
    def weighted_sum(self, inputs: list[list[bytes]], multipliers: list[int]) -> list[bytes]:
        """``sum_k m_k * ct_k`` chunk by chunk (plaintext integer multipliers >= 1)."""
        if not inputs or len(inputs) != len(multipliers):
            raise ValueError("weighted_sum needs one multiplier per input")
        n_chunks = {len(c) for c in inputs}
        if len(n_chunks) != 1:
            raise ValueError(f"inputs have different chunk counts {sorted(n_chunks)}")
        plains = {m: seal.Plaintext(format(int(m), "X")) for m in set(multipliers) if m != 1}
        out = []
        for i in range(n_chunks.pop()):
            acc = None
            for chunks, m in zip(inputs, multipliers):
                ct = self.load(chunks[i])
                if m != 1:
                    self.evaluator.multiply_plain_inplace(ct, plains[m])
                if acc is None:
                    acc = ct
                else:
                    self.evaluator.add_inplace(acc, ct)
            out.append(self.dump(acc))
        return out

    def subtract_plain(self, blobs: list[bytes], slots: np.ndarray) -> list[bytes]:
        """``ct_i - slots[i]`` for each ciphertext (no key needed: the server removes the
        masks that do not cancel, :mod:`crypto.masks`, without seeing the sum)."""
        slots = np.asarray(slots, dtype=np.uint64)
        if slots.shape != (len(blobs), self.params.slots):
            raise ValueError(f"slots of shape {slots.shape}: expected ({len(blobs)}, "
                             f"{self.params.slots})")
        if slots.size and int(slots.max()) >= self.plain_modulus:
            raise ValueError("slot values must be below the plaintext modulus")
        out = []
        for blob, row in zip(blobs, slots):
            ct, pt = self.load(blob), seal.Plaintext()
            self.encoder.encode(row.tolist(), pt)
            self.evaluator.sub_plain_inplace(ct, pt)
            out.append(self.dump(ct))
        return out

    def decrypt(self, blobs: list[bytes]) -> np.ndarray:
        """Slots of each ciphertext, shape (k, n) uint64."""
        self._need_secret("decrypt")
        rows = []
        for blob in blobs:
            ct = self.load(blob)
            if self._decryptor.invariant_noise_budget(ct) <= 0:
                raise BadCiphertext("noise budget exhausted: more clients or larger "
                                    "multipliers than the parameters allow")
            pt = seal.Plaintext()
            self._decryptor.decrypt(ct, pt)
            rows.append(np.asarray(self.encoder.decode_uint64(pt), dtype=np.uint64))
        return np.stack(rows) if rows else np.zeros((0, self.params.slots), np.uint64)

    def noise_budget(self, blob: bytes) -> int:
        """Bits of noise budget left in a ciphertext (needs the secret key)."""
        self._need_secret("measure the noise budget")
        return int(self._decryptor.invariant_noise_budget(self.load(blob)))
