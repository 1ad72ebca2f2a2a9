"""The institution's side of the masks (:mod:`crypto.masks`; the server's is
:mod:`server.masking`).

An institution's mask secrets live in its node state for the mask session (one per
join or rejoin of the run) and never leave it in the clear: its run key (share
encryption), the private key of each epoch it advertised (deleted once it has masked
with it) and the epochs it has masked and unmasked. What it checks, since the server
routes every message:

- every public key it uses (the run keys of its neighbours, their epoch keys) carries the
  owner's Ed25519 signature over the session, the epoch and the key: a server cannot
  slip in a key of its own (and learn a pairwise mask) or replay one of another session;
- the setup comes once per session;
- it masks once per epoch, with an epoch key it advertised and has not used, and only
  if enough of its share holders take part to reach the threshold of its *whole* holder
  set (its neighbours and itself): a server cannot shrink the group that protects it;
- at the unmasking it answers only an announcement that splits exactly the epoch's
  participants into survivors and dropped, names itself a survivor and keeps at least
  the threshold of its holders among the survivors, the same announcement every time it
  is asked; it returns shares of the self-mask seed of survivors and of the epoch key of
  the dropped, never both for one institution, and never a share of its own epoch key;
- an update is unmasked in one sum only (:class:`Releases`): training is deterministic
  given its inputs, so a round run again (another attempt, a resumed run, the same run
  started afresh) recomputes the same update, and two sums of it with different
  institutions would reveal it, or theirs. The record is kept in the institution's
  state folder, across runs, like its DP ledger; so are the mask sessions it has
  joined, none of which it joins twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context

from crypto import masks
from crypto.keys import ClientKeys
from crypto.masks import EPOCH_KEY, SELF, MaskError, MaskSettings, pack_doc, unpack_doc
from crypto.signing import SignatureError, sign, verify

STATE = "he-mask-state"
RELEASES = "he-mask-releases"  # the node's copy of its Releases record


class MaskReleased(MaskError):
    """An update already unmasked in another sum: never in a second one."""


class Releases:
    """What an institution's masks have released: the mask sessions it joined and, per
    update (the digest of everything that determines it: settings, round, start and
    trained model), the one set of survivors whose sum it was unmasked in.

    Kept in ``path`` (the institution's state folder, beside its DP ledger: it outlives
    runs) and in the node's state; written before any share leaves.
    """

    def __init__(self, context: Context, path: str | Path | None) -> None:
        self.context, self.path = context, Path(path) if path else None
        kept = context.state.config_records.get(RELEASES)
        text = str(kept["json"]) if kept is not None else ""
        if self.path is not None and self.path.exists():
            text = self.path.read_text()
        try:
            doc = json.loads(text) if text else {}
        except ValueError:
            raise MaskError(f"the mask release record {self.path} is not valid JSON: restore "
                            "it (it keeps this institution from releasing an update twice)") from None
        self.sessions: list[str] = list(doc.get("sessions", []))
        self.updates: dict[str, list[int]] = dict(doc.get("updates", {}))

    def save(self) -> None:
        from fedface.io import atomic_write_text

        text = json.dumps({"sessions": self.sessions, "updates": self.updates}, sort_keys=True)
        if self.path is not None:
            atomic_write_text(self.path, text)
        self.context.state[RELEASES] = ConfigRecord({"json": text})


def _state(context: Context, run: str) -> dict:
    doc = unpack_doc(context.state.get(STATE), "mask state") if STATE in context.state else {}
    if doc.get("run") != run:
        raise MaskError(f"no mask keys for run {run!r}: this institution did not join it (it "
                        "was unreachable at the start); it can join the next run")
    return doc


def _save(context: Context, doc: dict) -> None:
    context.state[STATE] = pack_doc(doc)


def _int(v, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise MaskError(f"{what} must be an integer, got {v!r}")
    return v


def _verified_public(keys: ClientKeys, advert: dict, *, kind: str, run: str, epoch: int,
                     sender: int) -> bytes:
    """The public key of a signed advert, checked against ``sender``'s signing key."""
    key = keys.verify_keys.get(sender)
    if key is None:
        raise MaskError(f"a {kind} key of institution {sender}, which is not in the key "
                        "ceremony: refused")
    try:
        public = bytes.fromhex(str(advert["public"]))
        signature = bytes.fromhex(str(advert["sig"]))
    except (KeyError, ValueError):
        raise MaskError(f"the {kind} key advert of institution {sender} is malformed") from None
    try:
        verify(key, signature, masks.advert_message(kind, run, sender, epoch, public),
               f"institution {sender}'s {kind} mask key (run {run}, epoch {epoch})")
    except SignatureError as err:
        raise MaskError(f"{err}: a key of another run or epoch, or not made by institution "
                        f"{sender} (a server cannot make one); refused") from None
    return public


def run_advert(context: Context, keys: ClientKeys, run: str, releases: Releases) -> ConfigRecord:
    """Start the session's mask state; the signed advert of this institution's run key
    (it encrypts the shares it exchanges with the others). A session it joined before is
    refused: its keys may have been rebuilt."""
    if run in releases.sessions:
        raise MaskError(f"mask session {run!r} was joined before: refused (an earlier "
                        "session's keys may have been rebuilt by the server)")
    releases.sessions.append(run)
    releases.save()
    private, public = masks.new_key_pair()
    _save(context, {"run": run, "run_private": private.hex(), "run_public": public.hex(),
                    "epochs": {}, "used": [], "rounds": {}, "answered": {}})
    signature = sign(keys.sign_key, masks.advert_message("run", run, keys.sender, 0, public))
    return pack_doc({"sender": keys.sender, "public": public.hex(), "sig": signature.hex()})


def setup(context: Context, keys: ClientKeys, run: str, doc: dict,
          expected: MaskSettings) -> ConfigRecord:
    """Take the run's members and the neighbours' signed run keys; advertise the first
    epoch key. The settings must be this institution's own (``expected``)."""
    state = _state(context, run)
    me = keys.sender
    if "members" in state:
        raise MaskError("a second mask setup in the same session: refused (it could change "
                        "the members and the holders that protect this institution)")
    members = sorted({_int(m, "a member") for m in doc.get("members", [])})
    if me not in members or len(members) < 2:
        raise MaskError(f"the mask setup names members {members}: it must name this institution "
                        "and at least one other")
    settings = MaskSettings(**doc.get("settings", {}))
    if settings != expected:
        raise MaskError(f"the mask setup asks degree {settings.degree}, threshold "
                        f"{settings.threshold}; this institution's run config says degree "
                        f"{expected.degree}, threshold {expected.threshold}: refused")
    neighbours = masks.graph(members, settings.degree_for(len(members)), run)[me]
    adverts = doc.get("run_keys", {})
    publics = {}
    for v in neighbours:
        if str(v) not in adverts:
            raise MaskError(f"the mask setup lacks the run key of neighbour {v}")
        publics[str(v)] = _verified_public(keys, adverts[str(v)], kind="run", run=run, epoch=0,
                                           sender=v).hex()
    state.update(members=members, settings=settings.to_dict(), neighbours=list(neighbours),
                 run_publics=publics)
    _save(context, state)
    return advertise(context, keys, run, _int(doc.get("epoch"), "the epoch"))


def _sealed_shares(state: dict, me: int, secret: bytes, holder_ids, needed: int, *, kind: str,
                   run: str, epoch: int) -> list[str]:
    """Shamir shares of ``secret`` (``needed`` of them rebuild it), each sealed to its
    holder under this institution's run key (hex, in ``holder_ids`` order)."""
    shares = masks.share_secret(secret, holder_ids, needed)
    own_run = bytes.fromhex(state["run_private"])
    publics = {**state["run_publics"], str(me): state["run_public"]}
    return [masks.seal_share(shares[h], own_run_private=own_run,
                             holder_run_public=bytes.fromhex(publics[str(h)]), kind=kind,
                             run=run, epoch=epoch, owner=me, holder=h).hex()
            for h in holder_ids]


def advertise(context: Context, keys: ClientKeys, run: str, epoch: int) -> ConfigRecord:
    """A fresh epoch key: its signed public half, and Shamir shares of its private half
    sealed to each holder (neighbours and this institution)."""
    state = _state(context, run)
    if "members" not in state:
        raise MaskError("no mask setup for this run yet")
    if epoch <= max(state["used"], default=0):
        raise MaskError(f"an epoch key for epoch {epoch} was asked, but this institution has "
                        f"masked in epoch {max(state['used'], default=0)}: epochs only move "
                        "forward")
    if str(epoch) in state.get("adverts", {}):  # asked again: the same key, never a second
        return pack_doc(state["adverts"][str(epoch)])
    me, settings = keys.sender, MaskSettings(**state["settings"])
    private, public = masks.new_key_pair()
    holder_ids = masks.holders({me: state["neighbours"]}, me)
    sealed = _sealed_shares(state, me, private, holder_ids, settings.needed(len(holder_ids)),
                            kind=EPOCH_KEY, run=run, epoch=epoch)
    signature = sign(keys.sign_key, masks.advert_message("epoch", run, me, epoch, public))
    advert = {"sender": me, "epoch": epoch, "public": public.hex(), "sig": signature.hex(),
              "holders": list(holder_ids), "shares": sealed}
    state["epochs"] = {str(epoch): private.hex()}  # an older, unused key is dropped
    state["adverts"] = {str(epoch): advert}
    _save(context, state)
    return pack_doc(advert)


def mask_update(context: Context, keys: ClientKeys, run: str, doc: dict, shape: tuple[int, int],
                modulus: int, server_round: int, update: str) -> tuple[np.ndarray, dict,
                                                                      ConfigRecord]:
    """This institution's mask for the epoch the training message names, for its update
    of round ``server_round`` whose inputs digest to ``update`` (hex).

    Returns the mask (slots, shape ``shape``, values mod ``modulus``), the ``meta`` its
    signed update envelope carries (epoch, participants, the commitment to the self-mask
    seed, a hash of the epoch key it used) and the self-mask seed's shares sealed to its
    holders among the participants.
    """
    state = _state(context, run)
    me = keys.sender
    epoch = _int(doc.get("epoch"), "the mask epoch")
    if epoch in state["used"]:
        raise MaskError(f"asked to mask twice in epoch {epoch}: refused (two updates under "
                        "the same pairwise masks would reveal their difference)")
    private = state["epochs"].get(str(epoch))
    if private is None:
        raise MaskError(f"no mask key of this institution for epoch {epoch} (it missed the key "
                        "exchange): it takes part again after catching up")
    participants = sorted({_int(p, "a participant") for p in doc.get("participants", [])})
    if me not in participants or not set(participants) <= set(state["members"]):
        raise MaskError(f"participants {participants} of epoch {epoch}: they must include this "
                        f"institution and be members of the run ({state['members']})")
    adverts = doc.get("epoch_keys", {})
    peers = {}
    for v in sorted(set(state["neighbours"]) & set(participants)):
        if str(v) not in adverts:
            raise MaskError(f"the training message lacks the epoch-{epoch} key of neighbour {v}")
        peers[v] = _verified_public(keys, adverts[str(v)], kind="epoch", run=run, epoch=epoch,
                                    sender=v)
    settings = MaskSettings(**state["settings"])
    needed = settings.needed(len(masks.holders({me: state["neighbours"]}, me)))
    holder_ids = masks.holders({me: state["neighbours"]}, me, among=participants)
    if not peers or len(holder_ids) < needed:
        raise MaskError(f"{len(holder_ids)} of this institution's share holders take part in "
                        f"epoch {epoch} (itself included), {needed} are needed: with fewer, its "
                        "update would be protected by fewer institutions than the threshold "
                        "assumes; refused (it takes part when more are back)")
    seed = os.urandom(32)
    count = int(shape[0]) * int(shape[1])
    mask = masks.mask_of(me, seed, bytes.fromhex(private), peers, run=run, epoch=epoch,
                         count=count, t=modulus).reshape(shape)
    sealed = _sealed_shares(state, me, seed, holder_ids, needed, kind=SELF, run=run,
                            epoch=epoch)
    state["used"] = sorted(set(state["used"]) | {epoch})  # forward secrecy: key dropped below
    state["rounds"][str(epoch)] = {"participants": participants, "round": int(server_round),
                                   "update": str(update)}
    own_public = masks.public_of(bytes.fromhex(private))
    state["epochs"].pop(str(epoch), None)
    _save(context, state)
    meta = {"mask-epoch": epoch, "mask-participants": participants,
            "mask-commit": masks.commit_self(seed, run, epoch, me), "mask-needed": needed,
            "mask-key": masks.key_digest(own_public)}
    return mask, meta, pack_doc({"holders": list(holder_ids), "shares": sealed})


def unmask(context: Context, keys: ClientKeys, run: str, doc: dict,
           releases: Releases) -> ConfigRecord:
    """This institution's shares for the server's announcement of epoch ``doc['epoch']``
    (see the module's checks); :class:`MaskError` names what is refused
    (:class:`MaskReleased`: its update was unmasked in another sum already). The release
    is recorded in ``releases`` before the shares are returned."""
    state = _state(context, run)
    me = keys.sender
    epoch = _int(doc.get("epoch"), "the mask epoch")
    record = state["rounds"].get(str(epoch))
    if record is None:
        raise MaskError(f"unmasking of epoch {epoch} asked, but this institution did not mask "
                        "in it")
    mine, update = record["participants"], str(record["update"])
    survivors = sorted({_int(s, "a survivor") for s in doc.get("survivors", [])})
    dropped = sorted({_int(d, "a dropped institution") for d in doc.get("dropped", [])})
    if set(survivors) & set(dropped) or sorted(set(survivors) | set(dropped)) != mine:
        missing = sorted(set(mine) - set(survivors) - set(dropped))
        extra = sorted((set(survivors) | set(dropped)) - set(mine))
        raise MaskError(f"the announcement of epoch {epoch} does not split its participants "
                        f"{mine} into survivors and dropped (survivors {survivors}, dropped "
                        f"{dropped}; missing {missing}, extra {extra}): refused")
    if me not in survivors:
        raise MaskError(f"the announcement of epoch {epoch} calls this institution dropped, "
                        "but it is answering: refused (its epoch key would reveal its update)")
    if len(survivors) < 2:
        raise MaskError(f"the announcement of epoch {epoch} names {len(survivors)} survivor: "
                        "a sum of one update is that update; refused")
    settings = MaskSettings(**state["settings"])
    full = masks.holders({me: state["neighbours"]}, me)
    needed = settings.needed(len(full))
    if len(set(full) & set(survivors)) < needed:
        raise MaskError(f"the announcement of epoch {epoch} keeps {len(set(full) & set(survivors))} "
                        f"of this institution's {len(full)} share holders among the survivors, "
                        f"{needed} are needed: the sum would be protected by fewer institutions "
                        "than the threshold assumes; refused")
    before = state["answered"].get(str(epoch))
    if before is not None and before != survivors:
        raise MaskError(f"a second, different announcement for epoch {epoch} (survivors "
                        f"{survivors}, before {before}): refused (it could rebuild both masks of "
                        "one institution)")
    earlier = releases.updates.get(update)
    if earlier is not None and earlier != survivors:
        raise MaskReleased(
            f"this institution's update of round {record['round']} (the same inputs, so the "
            f"same update) was already unmasked in the sum of {earlier}; this announcement "
            f"names {survivors}: two sums of one update with other institutions would reveal "
            "it or theirs; refused (the round can complete with the same survivors)")
    holders_of = set(state["neighbours"]) | {me}
    own_run = bytes.fromhex(state["run_private"])
    publics = {**state["run_publics"], str(me): state["run_public"]}
    out = []
    for item in doc.get("shares", []):
        kind, owner = item.get("kind"), _int(item.get("owner"), "a share's owner")
        if kind not in (SELF, EPOCH_KEY):
            raise MaskError(f"unknown share kind {kind!r}")
        if kind == SELF and owner not in survivors:
            raise MaskError(f"a self-mask share of institution {owner}, which the announcement "
                            "calls dropped: refused")
        if kind == EPOCH_KEY and owner not in dropped:
            raise MaskError(f"an epoch-key share of institution {owner}, which the announcement "
                            "calls a survivor: refused")
        if owner not in holders_of:
            raise MaskError(f"a share of institution {owner}, which is not a neighbour")
        share = masks.open_share(bytes.fromhex(str(item.get("blob", ""))), own_run_private=own_run,
                                 owner_run_public=bytes.fromhex(publics[str(owner)]), kind=kind,
                                 run=run, epoch=epoch, owner=owner, holder=me)
        out.append({"kind": kind, "owner": owner, "share": share.hex()})
    releases.updates[update] = survivors
    releases.save()  # before any share leaves
    state["answered"][str(epoch)] = survivors
    _save(context, state)
    return pack_doc({"sender": me, "epoch": epoch, "shares": out})
