"""The server's side of the masks (:mod:`crypto.masks`; the institutions' is
:mod:`client.masking`).

The server routes the institutions' signed keys and sealed shares (it cannot read a
share, nor make a key in an institution's name), names each training exchange's
participants, and after it the survivors; from the shares the survivors return it
rebuilds the self-mask seeds of the survivors and the epoch keys of the dropped, checks
each against what its owner signed, and computes the masks left in the sum
(:func:`crypto.masks.correction`). Too few shares, or shares that do not rebuild what
the owner signed, abort the exchange (:class:`RoundAborted`): the round is run again
with the institutions still there, never aggregated wrong.
"""

from __future__ import annotations

import numpy as np

from crypto import masks
from crypto.masks import EPOCH_KEY, SELF, MaskError, MaskSettings
from crypto.signing import SignatureError, verify


class RoundAborted(RuntimeError):
    """A training exchange whose masks cannot be removed. ``final``: some institutions
    already answered its unmasking, so running it again with other survivors would be
    refused (the round cannot complete until they are all back)."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


def _hex(doc: dict, name: str, what: str) -> bytes:
    try:
        return bytes.fromhex(str(doc[name]))
    except (KeyError, ValueError):
        raise MaskError(f"{what}: field {name!r} missing or not hex") from None


class MaskCoordinator:
    """One run's mask book-keeping on the server.

    Parameters
    ----------
    settings : MaskSettings
        Degree and threshold of the run.
    run : str
        The run id (bound into every key and share).
    verify_keys : dict[int, Ed25519PublicKey]
        The institutions' public signing keys (the ceremony's server bundle).
    """

    def __init__(self, settings: MaskSettings, run: str, verify_keys: dict) -> None:
        self.settings, self.run, self.verify_keys = settings, run, verify_keys
        self.members: list[int] = []
        self.neighbours: dict[int, tuple[int, ...]] = {}
        self.run_adverts: dict[int, dict] = {}
        self.epoch = 1  # the epoch of the next training exchange
        self.epoch_adverts: dict[int, dict[int, dict]] = {}  # epoch -> sender -> advert
        self.shares: dict[tuple[str, int, int, int], str] = {}  # (kind, epoch, owner, holder)
        self.updates: dict[int, dict] = {}  # this exchange: sender -> its mask meta
        self.announced: dict[int, tuple[list[int], list[int]]] = {}
        self.asked: dict[int, set[tuple[str, int]]] = {}  # holder -> shares asked of it

    # ------------------------------------------------------------------ keys
    def _check_advert(self, advert: dict, *, kind: str, epoch: int) -> tuple[int, bytes]:
        sender = advert.get("sender")
        key = self.verify_keys.get(sender) if isinstance(sender, int) else None
        if key is None:
            raise MaskError(f"a {kind} key advert of unknown institution {sender!r}")
        public, signature = _hex(advert, "public", "key advert"), _hex(advert, "sig", "key advert")
        try:
            verify(key, signature, masks.advert_message(kind, self.run, sender, epoch, public),
                   f"institution {sender}'s {kind} mask key")
        except SignatureError as err:
            raise MaskError(f"{err} (another run's or epoch's key?)") from None
        return sender, public

    def start(self, adverts: dict[int, dict]) -> list[tuple[int, str]]:
        """The members' run keys (``sender -> advert``); returns ``(sender, reason)`` of
        those refused. Fixes the members and the graph."""
        refused = []
        for sender, advert in sorted(adverts.items()):
            try:
                who, _ = self._check_advert(advert, kind="run", epoch=0)
                if who != sender:
                    raise MaskError(f"a run key of institution {who} sent by institution {sender}")
                self.run_adverts[sender] = advert
            except MaskError as err:
                refused.append((sender, str(err)))
        self.members = sorted(self.run_adverts)
        self.neighbours = masks.graph(self.members, self.settings.degree_for(len(self.members)),
                                      self.run)
        return refused

    def setup_doc(self, sender: int) -> dict:
        """What institution ``sender`` needs to start: members, settings, its neighbours'
        run keys, and the epoch to advertise a key for."""
        return {"members": self.members, "settings": self.settings.to_dict(),
                "epoch": self.epoch,
                "run_keys": {str(v): self.run_adverts[v] for v in self.neighbours[sender]}}

    def take_epoch_advert(self, sender: int, advert: dict, epoch: int) -> None:
        """Keep an institution's key for ``epoch`` and the shares of its private half
        (sealed to their holders)."""
        if advert.get("epoch") != epoch:
            raise MaskError(f"an epoch key for epoch {advert.get('epoch')!r}, epoch {epoch} was "
                            "asked")
        who, public = self._check_advert(advert, kind="epoch", epoch=epoch)
        if who != sender:
            raise MaskError(f"an epoch key of institution {who} sent by institution {sender}")
        masks.agree(masks.new_key_pair()[0], public)  # a low-order key is refused here
        holder_ids, sealed = advert.get("holders"), advert.get("shares")
        expected = list(masks.holders(self.neighbours, sender))
        if holder_ids != expected or not isinstance(sealed, list) or len(sealed) != len(expected):
            raise MaskError(f"institution {sender}'s epoch key comes with shares for {holder_ids}, "
                            f"its holders are {expected}")
        for h, blob in zip(holder_ids, sealed):
            self.shares[(EPOCH_KEY, epoch, sender, h)] = str(blob)
        self.epoch_adverts.setdefault(epoch, {})[sender] = {
            "sender": sender, "public": advert["public"], "sig": advert["sig"]}

    def participants(self) -> list[int]:
        """Members with a key for the coming epoch."""
        return sorted(self.epoch_adverts.get(self.epoch, {}))

    def train_doc(self, sender: int, participants: list[int]) -> dict:
        """The training message's mask part for ``sender``: epoch, participants, its
        participating neighbours' signed epoch keys."""
        adverts = self.epoch_adverts.get(self.epoch, {})
        return {"epoch": self.epoch, "participants": participants,
                "epoch_keys": {str(v): adverts[v] for v in self.neighbours[sender]
                               if v in participants}}

    # ------------------------------------------------------------------ the exchange
    def take_update(self, sender: int, meta: dict, record_doc: dict, participants: list[int]) -> None:
        """Check an update's mask meta (signed with the envelope) and keep its sealed
        self-mask shares."""
        if meta.get("mask-epoch") != self.epoch:
            raise MaskError(f"update masked for epoch {meta.get('mask-epoch')!r}, this exchange "
                            f"is epoch {self.epoch}: replayed or out of step")
        if meta.get("mask-participants") != participants:
            raise MaskError(f"update masked against participants {meta.get('mask-participants')}, "
                            f"this exchange named {participants}")
        expected = list(masks.holders(self.neighbours, sender, among=participants))
        holder_ids, sealed = record_doc.get("holders"), record_doc.get("shares")
        if holder_ids != expected or not isinstance(sealed, list) or len(sealed) != len(expected):
            raise MaskError(f"self-mask shares for {holder_ids}, the holders are {expected}")
        needed = self.settings.needed(len(masks.holders(self.neighbours, sender)))
        if meta.get("mask-needed") != needed:
            raise MaskError(f"self-mask threshold {meta.get('mask-needed')!r}, the run's is "
                            f"{needed}")
        advert = self.epoch_adverts.get(self.epoch, {}).get(sender)
        if advert is None or meta.get("mask-key") != masks.key_digest(bytes.fromhex(
                advert["public"])):
            raise MaskError(f"update masked with an epoch key ({meta.get('mask-key')!r}) other "
                            "than the one this server handed its neighbours: its masks would "
                            "not cancel")
        for h, blob in zip(holder_ids, sealed):
            self.shares[(SELF, self.epoch, sender, h)] = str(blob)
        self.updates[sender] = dict(meta)

    def unmask_docs(self, survivors: list[int], participants: list[int]) -> dict[int, dict]:
        """Per survivor, the announcement and the sealed shares it holds that are asked."""
        dropped = sorted(set(participants) - set(survivors))
        self.announced[self.epoch] = (sorted(survivors), dropped)
        out, self.asked = {}, {}
        for v in survivors:
            items = [{"kind": SELF, "owner": u, "blob": self.shares[(SELF, self.epoch, u, v)]}
                     for u in survivors if (SELF, self.epoch, u, v) in self.shares]
            items += [{"kind": EPOCH_KEY, "owner": d,
                       "blob": self.shares[(EPOCH_KEY, self.epoch, d, v)]}
                      for d in dropped if (EPOCH_KEY, self.epoch, d, v) in self.shares]
            out[v] = {"epoch": self.epoch, "survivors": sorted(survivors), "dropped": dropped,
                      "shares": items}
            self.asked[v] = {(i["kind"], i["owner"]) for i in items}
        return out

    def correction(self, replies: dict[int, dict], count: int, modulus: int) -> np.ndarray:
        """The masks left in the survivors' sum, from the holders' returned shares;
        :class:`RoundAborted` when some cannot be rebuilt or do not match what their
        owner signed."""
        survivors, dropped = self.announced[self.epoch]
        got: dict[tuple[str, int], dict[int, bytes]] = {}
        for holder, doc in sorted(replies.items()):
            for item in doc.get("shares", []):
                try:
                    asked = (item["kind"], int(item["owner"]))
                    share = bytes.fromhex(item["share"])
                except (KeyError, ValueError, TypeError):
                    raise RoundAborted(f"institution {holder} returned a malformed share") from None
                if asked in self.asked.get(holder, set()):  # only what was asked of it,
                    got.setdefault(asked, {}).setdefault(holder, share)  # once per holder
        seeds, keys = {}, {}
        for u in survivors:
            needed = int(self.updates[u]["mask-needed"])
            commit = self.updates[u]["mask-commit"]
            try:
                seeds[u] = masks.combine(
                    list(got.get((SELF, u), {}).values()), needed,
                    check=lambda s, u=u, c=commit: masks.commit_self(s, self.run, self.epoch, u) == c)
            except MaskError as err:
                raise RoundAborted(f"the self mask of institution {u} cannot be removed: {err} "
                                   f"({len(got.get((SELF, u), []))} of its holders answered, "
                                   f"{needed} needed; a seed must match the commitment in its "
                                   "signed update)") from None
        adverts = self.epoch_adverts.get(self.epoch, {})
        for d in dropped:
            if not set(self.neighbours[d]) & set(survivors):
                continue
            needed = self.settings.needed(len(masks.holders(self.neighbours, d)))
            public = adverts[d]["public"]
            try:
                keys[d] = masks.combine(
                    list(got.get((EPOCH_KEY, d), {}).values()), needed,
                    check=lambda k, p=public: masks.public_of(k).hex() == p)
            except MaskError as err:
                raise RoundAborted(f"the masks of dropped institution {d} cannot be removed: {err} "
                                   f"({len(got.get((EPOCH_KEY, d), []))} of its holders answered, "
                                   f"{needed} needed; a key must match the one it signed)") from None
        publics = {u: bytes.fromhex(adverts[u]["public"]) for u in survivors}
        try:
            return masks.correction(seeds, keys, publics, self.neighbours, survivors,
                                    run=self.run, epoch=self.epoch, count=count, t=modulus)
        except MaskError as err:
            raise RoundAborted(f"the masks left cannot be computed: {err}") from None

    def next_epoch(self) -> None:
        """The exchange is over (aggregated or aborted): its shares are forgotten."""
        self.shares = {k: v for k, v in self.shares.items() if k[1] > self.epoch}
        self.epoch_adverts = {e: a for e, a in self.epoch_adverts.items() if e > self.epoch}
        self.updates = {}
        self.epoch += 1

    def summary(self) -> dict:
        degrees = [len(v) for v in self.neighbours.values()]
        return {"members": len(self.members), "degree": max(degrees, default=0),
                "threshold": self.settings.threshold, "graph": (
                    "complete" if all(d == len(self.members) - 1 for d in degrees) else "harary")}
