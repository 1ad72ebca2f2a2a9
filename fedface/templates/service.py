"""Enrol, verify, identify, revoke and renew: a template store used through one scheme.

:class:`TemplateService` is what the ``fedface templates`` commands call. It takes raw
embeddings (from :mod:`fedface.templates.embed`), protects them with the scheme and
keeps only the protected template in the store (:mod:`fedface.templates.store`), whose
rows carry the scheme's key id and an integrity tag under the scheme's MAC key.

- A subject enrolled from several images gets one template: the mean of the normalised
  embeddings.
- A template stored under another key id than the key given is refused ("wrong key"),
  never compared; a row whose tag fails is reported and never matched.
- Renewal (:meth:`TemplateService.renew`) replaces a subject's template by one made under
  a new key from fresh embeddings (a protected template cannot, by design, be turned into
  another key's template).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedface.templates.schemes import Scheme, TemplateError, check_embeddings
from fedface.templates.store import Record, TemplateStore

__all__ = ["DEFAULT_THRESHOLDS", "TemplateService", "Match"]

#: Decision thresholds at FMR 0.1% on LFW View 2 for dlib's embedder, measured by
#: ``fedface bench templates`` (experiments/results/bench_templates.json): cosine for
#: projection and he, Hamming similarity for biohash (2,048 bits).
DEFAULT_THRESHOLDS = {"dlib": {"projection": 0.916, "he": 0.916, "biohash": 0.882}}


@dataclass(frozen=True)
class Match:
    """One comparison's outcome."""

    subject: str
    score: float
    match: bool

    def to_dict(self) -> dict:
        return {"subject": self.subject, "score": round(float(self.score), 6), "match": self.match}


class TemplateService:
    """A store used through one scheme (one key).

    Parameters
    ----------
    store : TemplateStore
        Where protected templates live.
    scheme : Scheme
        The protection (and its key) used for every operation of this service.
    threshold : float
        Decision threshold on the scheme's score (higher is more similar).
    """

    def __init__(self, store: TemplateStore, scheme: Scheme, threshold: float) -> None:
        self.store = store
        self.scheme = scheme
        self.threshold = float(threshold)

    # -- enrolment ----------------------------------------------------------------------
    @staticmethod
    def combine(emb) -> np.ndarray:
        """One embedding for a subject: the mean of the normalised rows (re-normalised)."""
        x = check_embeddings(emb).mean(axis=0)
        return check_embeddings(x)

    def enroll(self, subject: str, emb) -> Record:
        """Protect ``emb`` (one or several rows of one subject) and store it."""
        return self.enroll_many([(subject, emb)])[0]

    def enroll_many(self, items, progress=None, errors: list | None = None) -> list[Record]:
        """Enrol ``[(subject, emb), ...]``; ``progress(done, total)`` after each.

        A subject that cannot be enrolled (already enrolled, a bad embedding) stops the
        batch, or, when ``errors`` is a list, is appended to it as ``(subject, message)``
        and the batch goes on. A scheme with a search index (``he``: the encrypted gallery)
        gets every enrolled subject in one index update; if that update fails, the rows
        just enrolled are revoked and the error is raised, so no subject is left
        searchable 1:1 but missing from 1:N.
        """
        from fedface.templates.store import StoreError

        items = list(items)
        done: list[tuple[Record, np.ndarray]] = []
        stop = None
        try:  # rows and index together: an interruption anywhere revokes the rows enrolled
            for i, (subject, emb) in enumerate(items):
                try:
                    x = self.combine(emb)
                    (template,) = self.scheme.protect(x)
                    done.append((self.store.enroll(subject, self.scheme.name,
                                                   self.scheme.key_id, template,
                                                   self.scheme.mac_key), x))
                except (TemplateError, StoreError) as err:
                    if errors is None:
                        stop = err
                        break
                    errors.append((subject, str(err)))
                if progress is not None:
                    progress(i + 1, len(items))
            self._index(added=[(r.id, r.version, x[0]) for r, x in done])
        except BaseException:
            for r, _ in done:
                self.store.revoke(r.subject, self.scheme.name, self.scheme.mac_key,
                                  self.scheme.key_id)
            raise
        if stop is not None:
            raise stop
        return [r for r, _ in done]

    def _index(self, added=(), removed=()) -> None:
        if hasattr(self.scheme, "update_index"):
            self.scheme.update_index(self.store, added, removed)

    def renew(self, subject: str, emb, old: Scheme | None = None) -> Record:
        """Replace ``subject``'s template by one under this service's key, from fresh
        embeddings. A subject stored under another key is moved (a key rotation) only with
        ``old``, the scheme of that key: the store checks the row under it first, and the
        old key's search index (``he``) loses the subject's slot."""
        x = self.combine(emb)
        (template,) = self.scheme.protect(x)
        extra = {} if old is None else {"old_key_id": old.key_id, "old_mac_key": old.mac_key}
        before = self.store.records(self.scheme.name, subject=subject)
        rec = self.store.renew(subject, self.scheme.name, self.scheme.key_id, template,
                               self.scheme.mac_key, **extra)
        moved = bool(before) and before[0].key_id != rec.key_id
        self._index(added=[(rec.id, rec.version, x[0])],
                    removed=[] if moved else [(rec.id, rec.version - 1)])
        if moved and hasattr(old, "update_index"):
            old.update_index(self.store, removed=[(rec.id, rec.version - 1)])
        return rec

    def revoke(self, subject: str) -> Record:
        rec = self.store.revoke(subject, self.scheme.name, self.scheme.mac_key,
                                self.scheme.key_id)
        self._index(removed=[(rec.id, rec.version - 1)])
        return rec

    # -- comparison ---------------------------------------------------------------------
    def verify(self, subject: str, emb) -> Match:
        """1:1: ``subject``'s stored template against the probe (a template made under
        another key is refused by the store, :class:`~fedface.templates.store.WrongKey`)."""
        rec = self.store.get(subject, self.scheme.name, self.scheme.mac_key, self.scheme.key_id)
        score = float(self.scheme.scores([rec.template], self.combine(emb))[0])
        return Match(subject, score, score >= self.threshold)

    def identify(self, emb, k: int = 5) -> dict:
        """1:N: the ``k`` best-scoring active subjects under this key.

        Returns ``{"candidates": [Match, ...], "searched": n, "tampered": [subject, ...],
        "other_keys": [subject, ...], "not_indexed": [subject, ...]}``: rows whose tag fails
        are listed and never scored; active rows under another key are listed, not scored
        (a row whose key id was edited shows up there: a subject listed there that no one
        moved to another key is a tampered row); rows missing from an encrypted gallery
        are listed, never ranked.
        """
        if k < 1:
            raise TemplateError(f"--top {k}: ask for at least one candidate")
        mine, bad = self.store.verified(self.scheme.name, self.scheme.mac_key, self.scheme.key_id)
        others = sorted(r.subject for r in self.store.records(self.scheme.name)
                        if r.key_id != self.scheme.key_id)
        probe = self.combine(emb)
        if hasattr(self.scheme, "search"):
            scores = self.scheme.search(self.store, mine, probe)
        else:
            scores = self.scheme.scores([r.template for r in mine], probe)
        order = [i for i in np.argsort(-np.asarray(scores), kind="stable")
                 if np.isfinite(scores[i])][:k]
        return {"candidates": [Match(mine[i].subject, float(scores[i]),
                                     float(scores[i]) >= self.threshold) for i in order],
                "searched": len(mine), "tampered": [r.subject for r in bad],
                "other_keys": others,
                "not_indexed": [mine[i].subject for i in range(len(mine))
                                if not np.isfinite(scores[i])]}
