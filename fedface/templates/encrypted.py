"""Encrypted templates (``he``): CKKS-encrypted embeddings matched under encryption.

The cryptography is :mod:`crypto.match`; this module binds it to the store:

- each subject's row holds its 1:1 template (one ciphertext, the embedding tiled over
  the slots);
- the store's search index (:meth:`TemplateStore.updating_index`) holds the 1:N gallery
  (Boddeti's column packing, folded), one part per block of templates, updated by
  homomorphic additions at each enrolment and with a dead slot at each revocation. A
  gallery slot is named ``<row id>.<row version>``, so a renewed or re-enrolled subject
  gets a fresh slot and the old one stays dead.

Roles: the key ceremony (``fedface keys match --out DIR``) writes ``DIR/public`` (the
matching server and enrolment stations: public and evaluation keys, the store's tag key;
no secret key) and ``DIR/secret`` (the key holder). Enrolment, revocation and the
encrypted search need only ``public``; decrypting a score needs ``secret``. The command
line, which plays both roles in one process, takes ``DIR``; a deployment runs the server
side with ``DIR/public`` and sends score ciphertexts to the key holder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crypto.keys import KeyBundleError
from crypto.match import (
    PUBLIC_DIR,
    SECRET_DIR,
    Gallery,
    MatchKeys,
    decrypt_score,
    decrypt_scores,
    encrypt_probe,
    encrypt_template,
    load_match_keys,
    score_1to1,
)
from fedface.templates.schemes import Scheme, TemplateError, check_embeddings

__all__ = ["EncryptedScheme", "slot_id"]


def slot_id(row_id: int, version: int) -> str:
    """The gallery slot name of a row at a version."""
    return f"{int(row_id)}.{int(version)}"


class EncryptedScheme(Scheme):
    """CKKS-encrypted templates; see the module docstring for who holds which key.

    Parameters
    ----------
    server : MatchKeys
        Keys of ``public/`` (encrypt, compute on ciphertexts).
    holder : MatchKeys, optional
        Keys of ``secret/`` (encrypt probes, decrypt scores); without it only enrolment,
        revocation and renewal work.
    """

    name = "he"
    code = 3

    def __init__(self, server: MatchKeys, holder: MatchKeys | None = None) -> None:
        if server.has_secret:
            raise TemplateError("the matching server's keys must come from the public/ folder")
        if holder is not None and holder.key_id != server.key_id:
            raise TemplateError(f"the key holder's keys (key id {holder.key_id}) are not the pair "
                                f"of the public keys ({server.key_id}): use one ceremony's folders")
        if server.store_key is None:
            raise TemplateError("the public folder has no store.key: make the keys again with "
                                "`fedface keys match --out DIR`")
        self.server, self.holder = server, holder
        self.key_id = server.key_id
        self.mac_key = server.store_key

    @classmethod
    def load(cls, folder: str | Path) -> EncryptedScheme:
        """From a ceremony folder (``public`` and ``secret`` inside) or a ``public`` folder."""
        folder = Path(folder)
        try:
            if (folder / PUBLIC_DIR).is_dir():
                holder = (load_match_keys(folder / SECRET_DIR, public=folder / PUBLIC_DIR)
                          if (folder / SECRET_DIR).is_dir() else None)
                return cls(load_match_keys(folder / PUBLIC_DIR), holder)
            keys = load_match_keys(folder)
        except KeyBundleError as err:
            raise TemplateError(str(err)) from None
        if keys.has_secret:
            raise TemplateError(f"{folder} is the key holder's folder: pass the ceremony folder "
                                "(public/ and secret/ inside), or its public/ folder to enrol")
        return cls(keys)

    def _need_holder(self, what: str) -> MatchKeys:
        if self.holder is None:
            raise TemplateError(f"cannot {what}: the keys given hold no secret key (public/ only); "
                                "scores are decrypted by the key holder: pass the ceremony folder "
                                "that holds secret/")
        return self.holder

    # -- 1:1 ------------------------------------------------------------------------------
    def protect(self, emb) -> list[bytes]:
        x = check_embeddings(emb)
        return [self.wrap(x.shape[1], encrypt_template(self.server, row)) for row in x]

    def scores(self, templates: list[bytes], probe) -> np.ndarray:
        holder = self._need_holder("decrypt a score")
        p = check_embeddings(probe)
        out = []
        query = encrypt_probe(holder, p[0], "1:1")
        for t in templates:
            dim, payload = self.unwrap(t)
            if dim != p.shape[1]:
                raise TemplateError(f"probe embedding of dimension {p.shape[1]}, but the template "
                                    f"was enrolled at dimension {dim}: use the same embedder "
                                    "(--embedder/--model) as at enrolment")
            out.append(decrypt_score(holder, score_1to1(self.server, payload, query)))
        return np.asarray(out, dtype=np.float64)

    # -- 1:N: the gallery in the store's search index ----------------------------------------
    def _gallery(self, parts: dict[int, bytes], dim: int) -> Gallery:
        if not parts:
            return Gallery(self.server, dim)
        return Gallery.from_bytes(self.server, [parts[k] for k in sorted(parts)])

    def update_index(self, store, added=(), removed=()) -> None:
        """Add ``[(row id, version, embedding), ...]`` to the gallery and kill the slots of
        ``[(row id, version), ...]``, in one store transaction."""
        added, removed = list(added), list(removed)
        if not added and not removed:
            return
        with store.updating_index(self.name, self.key_id, self.mac_key) as parts:
            if not parts and not added:
                return  # nothing indexed under this key: nothing to kill
            dim = int(np.asarray(added[0][2]).shape[-1]) if added else 1
            gallery = self._gallery(parts, dim)
            for rid, ver in removed:
                if slot_id(rid, ver) in gallery.ids:
                    gallery.revoke(slot_id(rid, ver))
            if added:
                embs = check_embeddings(np.stack([np.asarray(e, float) for _, _, e in added]),
                                        gallery.dim)
                gallery.enroll(embs, [slot_id(r, v) for r, v, _ in added])
            for k, blob in enumerate(gallery.to_bytes()):
                parts[k] = blob

    def search(self, store, records, probe) -> np.ndarray:
        """Scores of ``probe`` against ``records`` (verified active rows) through the
        encrypted gallery; a record missing from the gallery scores ``-inf``."""
        holder = self._need_holder("decrypt the search scores")
        if not records:
            return np.zeros(0)
        parts = store.index_parts(self.name, self.key_id, self.mac_key)
        p = check_embeddings(probe)
        gallery = self._gallery(parts, p.shape[1])
        if parts and gallery.dim != p.shape[1]:
            raise TemplateError(f"probe embedding of dimension {p.shape[1]}, but the gallery was "
                                f"enrolled at dimension {gallery.dim}: use the same embedder")
        if not len(gallery):
            return np.full(len(records), -np.inf)
        got = decrypt_scores(holder, gallery.search(encrypt_probe(holder, p[0], "1:N")))
        return np.array([got.get(slot_id(r.id, r.version), -np.inf) for r in records])

    def describe(self) -> dict:
        return {**super().describe(), "params": self.server.params.to_dict()}
