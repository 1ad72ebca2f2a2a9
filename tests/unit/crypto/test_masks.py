"""Masks under the encryption (crypto/masks.py, client/masking.py, server/masking.py).

The protocol is driven here without Flower: real X25519 keys, Shamir shares, AES-GCM
sealed shares, Ed25519-signed keys and real BFV ciphertexts, with the institutions'
and the server's code exactly as a run calls it. Each test plays an adversary: the
server with one colluding institution (it holds the shared BFV key), a server that
lies about who dropped, forges or replays keys, or tampers with shares.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from client import masking
from crypto import masks
from crypto.masks import MaskError, MaskSettings, pack_doc, unpack_doc
from fedface.runner import MaskedFederation
from server.masking import RoundAborted

N = 6  # institutions of the ceremony (conftest.py)
RUN = "run-under-test"
SHAPE = (1, 4096)


class Federation(MaskedFederation):
    """The runner's protocol harness, with the test's random updates and decryption."""

    def __init__(self, folder, n: int, settings: MaskSettings | None = None, run: str = RUN):
        super().__init__(folder, n, settings, run)
        self.rng = np.random.default_rng(0)

    def updates(self) -> dict[int, np.ndarray]:
        return {k: self.rng.integers(0, 2 ** 20, SHAPE).astype(np.uint64) for k in range(self.n)}

    def unmask(self, cts, answering=None) -> np.ndarray:
        return self.keys[0].context.decrypt(super().unmask(cts, answering))


def _sum(xs, ks):
    return sum(xs[k] for k in ks)


# ----------------------------------------------------------------------- the sum
def test_masked_sum_decrypts_exactly_to_the_unmasked_sum_round_after_round(ceremony):
    fed = Federation(ceremony, 4)
    for _ in range(2):  # fresh epoch keys each exchange
        xs = fed.updates()
        out = fed.unmask(fed.send(xs, range(4)))
        assert np.array_equal(out, _sum(xs, range(4)))


@pytest.mark.parametrize("stage", ["before sending", "after sending", "both"])
def test_dropouts_at_every_stage_leave_the_exact_sum_of_the_survivors(ceremony, stage):
    fed = Federation(ceremony, 6)  # complete graph: 6 holders each, 4 needed
    xs = fed.updates()
    senders = {0, 1, 2, 3, 4} if stage != "after sending" else {0, 1, 2, 3, 4, 5}
    answering = {"before sending": [0, 1, 2, 3, 4],  # 5 never sent its update
                 "after sending": [0, 1, 2, 3, 4],  # 5 sent it, then left
                 "both": [0, 1, 2, 3]}[stage]  # 5 never sent; 4 sent, then left
    cts = fed.send(xs, senders)
    out = fed.unmask(cts, answering)
    assert np.array_equal(out, _sum(xs, sorted(senders)))
    # The next exchange goes on with those that advertised a key (the others catch up).
    fed.rekey([k for k in range(6) if k not in answering])
    xs = fed.updates()
    assert np.array_equal(fed.unmask(fed.send(xs, range(6))), _sum(xs, range(6)))


def test_at_the_threshold_the_round_completes_and_below_it_aborts_never_wrong(ceremony):
    fed = Federation(ceremony, 5)  # complete graph: 5 holders each
    assert [fed.coord.settings.needed(h) for h in (3, 4, 5, 6, 8)] == [3, 3, 4, 4, 5]
    xs = fed.updates()
    assert np.array_equal(fed.unmask(fed.send(xs, range(5)), [0, 1, 2, 3]), _sum(xs, range(5)))
    fed.rekey([4])
    xs = fed.updates()
    cts = fed.send(xs, range(5))
    with pytest.raises(RoundAborted, match="3 of its holders answered, 4 needed"):
        fed.unmask(cts, [0, 1, 2])
    # Aborted: the next exchange is a fresh epoch with those that are still there.
    assert fed.coord.participants() == [0, 1, 2]


def test_an_equivocating_server_cannot_rebuild_both_secrets_even_with_a_colluder(ceremony):
    """The server tells holders 0 and 1 that institution 4 survived and holders 2 and 3
    that it dropped; colluding holder 5 answers both. Neither secret reaches the
    threshold from the other side's holders: 3 shares each, 4 needed."""
    fed = Federation(ceremony, 6)
    fed.send(fed.updates(), range(6))
    said_alive = fed.coord.unmask_docs([0, 1, 2, 3, 4, 5], fed.participants)
    said_dropped = fed.coord.unmask_docs([0, 1, 2, 3, 5], fed.participants)
    got = {masks.SELF: [], masks.EPOCH_KEY: []}
    for k, docs in [(0, said_alive), (1, said_alive), (5, said_alive),
                    (2, said_dropped), (3, said_dropped), (5, said_dropped)]:
        rec = unpack_doc(masking.unmask(fed.ctx[k], fed.keys[k], RUN, docs[k], fed.releases[k])
                         if k != 5 else _colluder_answers(fed, docs[k]), "s")
        for item in rec["shares"]:
            if item["owner"] == 4:
                got[item["kind"]].append(bytes.fromhex(item["share"]))
    needed = fed.coord.settings.needed(6)
    assert needed == 4 and len(got[masks.SELF]) == 3 and len(got[masks.EPOCH_KEY]) == 3
    with pytest.raises(MaskError, match="3 distinct shares, 4 needed"):
        masks.combine(got[masks.SELF], needed)


def _colluder_answers(fed, doc):
    """Institution 5 colludes: it opens whatever share it is sent, without the checks."""
    state = unpack_doc(fed.ctx[5].state[masking.STATE], "state")
    publics = {**state["run_publics"], "5": state["run_public"]}
    out = [{"kind": i["kind"], "owner": i["owner"], "share": masks.open_share(
        bytes.fromhex(i["blob"]), own_run_private=bytes.fromhex(state["run_private"]),
        owner_run_public=bytes.fromhex(publics[str(i["owner"])]), kind=i["kind"], run=RUN,
        epoch=doc["epoch"], owner=i["owner"], holder=5).hex()} for i in doc["shares"]]
    return pack_doc({"shares": out})


def test_a_sparse_graph_keeps_each_institution_s_cost_logarithmic():
    for n, expect in [(8, 7), (16, 15), (32, 20), (100, 28), (1000, 40)]:
        s = MaskSettings()
        g = masks.graph(range(n), s.degree_for(n), "run")
        degrees = {len(v) for v in g.values()}
        assert max(degrees) <= expect and min(degrees) >= min(expect, n - 1) - 0
        assert all(u in g[v] for u in g for v in g[u])  # symmetric
        seen, todo = {0}, [0]  # connected
        while todo:
            for v in g[todo.pop()]:
                if v not in seen:
                    seen.add(v)
                    todo.append(v)
        assert len(seen) == n
    assert masks.auto_degree(100) <= 4 * math.ceil(math.log2(100))


# ----------------------------------------------------------------------- collusion
def test_the_server_with_one_colluding_institution_reads_uniform_noise(ceremony):
    """The server's view of institution 1's update, decrypted with the shared BFV key of
    institution 0 (the colluder): uniform modulo t and uncorrelated with the update."""
    fed = Federation(ceremony, 4)
    xs = fed.updates()
    xs[1] = (np.arange(4096, dtype=np.uint64) % 1024).reshape(SHAPE)  # a structured update
    cts = fed.send(xs, range(4))
    seen = fed.keys[0].context.decrypt(cts[1]).ravel().astype(np.float64)
    n, t = seen.size, float(fed.t)
    # Uniform in [0, t): 16 equal bins, chi-square with 15 degrees of freedom (p < 1e-4).
    counts = np.bincount(np.minimum((seen / t * 16).astype(int), 15), minlength=16)
    chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 < 45.0
    assert abs(seen.mean() / t - 0.5) < 4 * math.sqrt(1 / 12 / n)
    corr = np.corrcoef(seen, xs[1].ravel().astype(np.float64))[0, 1]
    assert abs(corr) < 4 / math.sqrt(n)
    assert np.array_equal(fed.unmask(cts), _sum(xs, range(4)))  # and the sum is exact


def test_another_combination_of_masked_updates_decrypts_to_noise(ceremony):
    """FV's candidate weightings multiply updates by different integers: under masks
    that combination does not cancel them, so the server learns nothing from it (and
    add_updates refuses to build it)."""
    from crypto.envelope import EnvelopeError
    from crypto.packing import make_layout
    from crypto.update import MASK_EPOCH, add_updates

    fed = Federation(ceremony, 3)
    xs = fed.updates()
    cts = fed.send(xs, range(3))
    ctx = fed.server.context
    weighted = fed.keys[0].context.decrypt(ctx.weighted_sum([cts[0], cts[1], cts[2]], [2, 1, 1]))
    target = 2 * xs[0] + xs[1] + xs[2]
    assert np.mean(weighted == target) < 0.01 and weighted.mean() > fed.t / 8

    class _Env:  # what add_updates reads of a masked update
        def __init__(self, sender):
            self.meta = {MASK_EPOCH: 1}
            self.header = {"layout": make_layout(4096, 15, 0.5, 16, 1, 4096, 40).to_dict(),
                           "spec": "s", "sender": sender, "meta": self.meta}
    with pytest.raises(EnvelopeError, match="another combination"):
        add_updates(fed.server, [_Env(0), _Env(1)], [2, 1], run=RUN, server_round=1,
                    max_units=16, unmask=np.zeros(SHAPE, np.uint64))


# ----------------------------------------------------------------------- a lying server
def test_a_holder_never_reveals_both_masks_of_one_institution(ceremony):
    fed = Federation(ceremony, 6)
    fed.send(fed.updates(), range(6))
    honest = fed.coord.unmask_docs(list(range(6)), fed.participants)
    masking.unmask(fed.ctx[0], fed.keys[0], RUN, honest[0], fed.releases[0])  # b_4, b_5 shares
    # The server now says 4 and 5 dropped, to get their epoch keys from the same holder.
    lie = fed.coord.unmask_docs([0, 1, 2, 3], fed.participants)
    with pytest.raises(MaskError, match="second, different announcement"):
        masking.unmask(fed.ctx[0], fed.keys[0], RUN, lie[0], fed.releases[0])
    # A share request that contradicts the announcement it comes with is refused too.
    mixed = dict(honest[1])
    mixed["shares"] = [{"kind": masks.EPOCH_KEY, "owner": 3, "blob": "00"}]
    with pytest.raises(MaskError, match="calls a survivor"):
        masking.unmask(fed.ctx[1], fed.keys[1], RUN, mixed, fed.releases[1])


def test_the_server_cannot_shrink_the_group_that_protects_an_institution(ceremony):
    """The server names only the target 0 and its colluder 3 as participants (or as
    survivors): 0 would mask with 3 alone and share its seed with 3 alone. Refused: the
    threshold counts all of 0's holders, and 3 of its 4 must take part and survive."""
    fed = Federation(ceremony, 4)
    small = fed.coord.train_doc(0, [0, 3])
    small["participants"] = [0, 3]
    with pytest.raises(MaskError, match="2 of this institution's share holders take part"):
        masking.mask_update(fed.ctx[0], fed.keys[0], RUN, small, SHAPE, fed.t, 1, "update")
    fed.send(fed.updates(), range(4))
    doc = {"epoch": fed.coord.epoch, "survivors": [0, 3], "dropped": [1, 2], "shares": []}
    with pytest.raises(MaskError, match="keeps 2 of this institution's 4 share holders"):
        masking.unmask(fed.ctx[0], fed.keys[0], RUN, doc, fed.releases[0])
    with pytest.raises(MaskError, match="second mask setup"):
        masking.setup(fed.ctx[0], fed.keys[0], RUN, fed.coord.setup_doc(0), MaskSettings())


def test_telling_each_holder_another_story_does_not_expose_an_update(ceremony):
    """The review's attack on 4 institutions (target 0, colluder 3): holder 1 hears
    "2 dropped", holder 2 hears "1 dropped", the target hears "1 and 2 dropped", to
    rebuild 0's self-mask seed and both neighbours' exchange keys. The target refuses
    its story (too few of its holders survive), so 1's key stays out of reach."""
    fed = Federation(ceremony, 4)
    fed.send(fed.updates(), range(4))
    stories = {1: [0, 1, 3], 2: [0, 2, 3], 0: [0, 3]}
    keys_of = {1: [], 2: []}
    for holder, survivors in stories.items():
        doc = fed.coord.unmask_docs(survivors, fed.participants)[holder]
        try:
            rec = unpack_doc(masking.unmask(fed.ctx[holder], fed.keys[holder], RUN, doc,
                                            fed.releases[holder]), "s")
        except MaskError as err:
            assert holder == 0 and "share holders among the survivors" in str(err)
            continue
        for item in rec["shares"]:
            if item["kind"] == masks.EPOCH_KEY:
                keys_of[item["owner"]].append(item["share"])
    # The colluder adds its own share of each: 2 of the 3 needed for key 1.
    assert len(keys_of[1]) + 1 < fed.coord.settings.needed(4)


def test_an_update_is_never_unmasked_in_two_sums(ceremony):
    """A server that fakes an abort after the sum of round 1 and has it run again
    without institution 5 (or without 5 and a colluder) would subtract the two sums.
    Training is deterministic given its inputs, so the re-run recomputes the same
    updates: each institution refuses to unmask its update in a second, different sum
    (the record outlives the run), and answers the same survivors again."""
    from client.masking import MaskReleased

    fed = Federation(ceremony, 6)
    xs = fed.updates()
    assert np.array_equal(fed.unmask(fed.send(xs, range(6), server_round=1)), _sum(xs, range(6)))
    for without in ([5], [4, 5]):
        fed.rekey(range(6))
        cts = fed.send(xs, [k for k in range(6) if k not in without], server_round=1)
        with pytest.raises(MaskReleased, match="already unmasked in the sum of \\[0, 1, 2, 3, 4, 5\\]"):
            fed.unmask(cts)
        fed.coord.next_epoch()  # the server gives up on that exchange
    fed.rekey(range(6))  # the same survivors again: the same sum, answered
    assert np.array_equal(fed.unmask(fed.send(xs, range(6), server_round=1)), _sum(xs, range(6)))
    # The record lives in the institution's state folder, across runs and sessions.
    path = fed.ctx[0].state["he-mask-releases"]["json"]
    assert '"sessions": ["run-under-test"]' in path and "[0, 1, 2, 3, 4, 5]" in path


def test_a_mask_session_is_joined_once(ceremony, tmp_path):
    from client.masking import Releases

    fed = Federation(ceremony, 3)
    record = Releases(fed.ctx[0], tmp_path / "mask_releases.json")
    masking.run_advert(fed.ctx[0], fed.keys[0], "run.s1", record)
    again = Releases(fed.ctx[0], tmp_path / "mask_releases.json")  # a restarted node
    assert "run.s1" in again.sessions
    with pytest.raises(MaskError, match="was joined before"):
        masking.run_advert(fed.ctx[0], fed.keys[0], "run.s1", again)
    from flwr.app import Context, RecordDict

    ctx = Context(run_id=1, node_id=9, node_config={}, state=RecordDict(), run_config={})
    masking.run_advert(ctx, fed.keys[1], "run.s2", Releases(ctx, None))
    with pytest.raises(MaskError, match="run config says degree 0"):
        masking.setup(ctx, fed.keys[1], "run.s2", {**fed.coord.setup_doc(1),
                                                   "settings": {"degree": 1}}, MaskSettings())


def test_an_earlier_session_s_keys_are_not_accepted(ceremony):
    """After a rejoin (a new mask session) the server replays the epoch-1 keys of the
    earlier session, some of which it may have rebuilt: they do not verify."""
    old = Federation(ceremony, 3, run="run.session-a")
    new = Federation(ceremony, 3, run="run.session-b")
    doc = new.coord.train_doc(0, [0, 1, 2])
    replay = dict(doc, epoch_keys=old.coord.train_doc(0, [0, 1, 2])["epoch_keys"])
    with pytest.raises(MaskError, match="another run or epoch"):
        masking.mask_update(new.ctx[0], new.keys[0], "run.session-b", replay, SHAPE, new.t, 1, "update")


def test_a_key_asked_twice_is_the_same_and_an_update_under_another_is_refused(ceremony):
    fed = Federation(ceremony, 3)
    doc = fed.coord.train_doc(0, [0, 1, 2])
    _, meta, rec = masking.mask_update(fed.ctx[0], fed.keys[0], RUN, doc, SHAPE, fed.t, 1, "update")
    a = masking.advertise(fed.ctx[0], fed.keys[0], RUN, 2)
    assert masking.advertise(fed.ctx[0], fed.keys[0], RUN, 2)["doc"] == a["doc"]
    with pytest.raises(MaskError, match="other than the one this server handed"):
        fed.coord.take_update(0, {**meta, "mask-key": "0" * 32}, unpack_doc(rec, "s"),
                              [0, 1, 2])


def test_one_wrong_share_among_enough_does_not_stop_the_round(ceremony):
    fed = Federation(ceremony, 6)  # 6 holders, 4 needed: 2 spare
    xs = fed.updates()
    cts = fed.send(xs, range(6))
    docs = fed.coord.unmask_docs(list(range(6)), fed.participants)
    replies = {k: unpack_doc(masking.unmask(fed.ctx[k], fed.keys[k], RUN, docs[k],
                                            fed.releases[k]), "s") for k in range(6)}
    for item in replies[0]["shares"]:  # holder 0 lies about every share it holds
        item["share"] = bytes(len(bytes.fromhex(item["share"]))).hex()
    replies[1]["shares"].append({"kind": masks.SELF, "owner": 2, "share": "00" * 52})  # unasked
    corr = fed.coord.correction(replies, SHAPE[0] * SHAPE[1], fed.t)
    fed.coord.next_epoch()
    total = fed.server.context.subtract_plain(
        fed.server.context.weighted_sum([cts[k] for k in range(6)], [1] * 6), corr.reshape(SHAPE))
    assert np.array_equal(fed.keys[0].context.decrypt(total), _sum(xs, range(6)))


@pytest.mark.parametrize("survivors,dropped,match", [
    ([0, 1, 2], [], "missing \\[3\\]"),
    ([0, 1, 2, 3, 5], [], "extra \\[5\\]"),
    ([1, 2, 3], [0], "calls this institution dropped"),
    ([0], [1, 2, 3], "survivor: a sum of one update"),
])
def test_a_wrong_announcement_is_refused_with_the_reason(ceremony, survivors, dropped, match):
    fed = Federation(ceremony, 4)
    fed.send(fed.updates(), range(4))
    doc = {"epoch": fed.coord.epoch, "survivors": survivors, "dropped": dropped, "shares": []}
    with pytest.raises(MaskError, match=match):
        masking.unmask(fed.ctx[0], fed.keys[0], RUN, doc, fed.releases[0])


def test_a_server_made_or_replayed_key_is_refused(ceremony):
    """The server swaps in an epoch key of its own (right format) for neighbour 1, to
    learn institution 0's pairwise mask with it; or replays a key of another run."""
    fed = Federation(ceremony, 3)
    doc = fed.coord.train_doc(0, fed.coord.participants())
    _, public = masks.new_key_pair()
    forged = dict(doc, epoch_keys=dict(doc["epoch_keys"]))
    forged["epoch_keys"]["1"] = dict(doc["epoch_keys"]["1"], public=public.hex())
    with pytest.raises(MaskError, match="does not verify"):
        masking.mask_update(fed.ctx[0], fed.keys[0], RUN, forged, SHAPE, fed.t, 1, "update")
    other = Federation(ceremony, 3, run="another-run")
    replay = dict(doc, epoch_keys=other.coord.train_doc(0, [0, 1, 2])["epoch_keys"])
    with pytest.raises(MaskError, match="another run or epoch"):
        masking.mask_update(fed.ctx[0], fed.keys[0], RUN, replay, SHAPE, fed.t, 1, "update")
    # The server refuses a key signed for another run, too.
    with pytest.raises(MaskError, match="does not verify"):
        fed.coord.take_epoch_advert(1, {**other.coord.epoch_adverts[1][1], "epoch": 1,
                                        "holders": [0, 1, 2], "shares": ["", "", ""]}, 1)


def test_a_tampered_or_misaddressed_share_does_not_verify(ceremony):
    fed = Federation(ceremony, 3)
    fed.send(fed.updates(), range(3))
    doc = fed.coord.unmask_docs([0, 1, 2], fed.participants)[0]
    bad = dict(doc, shares=[dict(doc["shares"][1])])
    blob = bytearray(bytes.fromhex(bad["shares"][0]["blob"]))
    blob[-1] ^= 1
    bad["shares"][0]["blob"] = bytes(blob).hex()
    with pytest.raises(MaskError, match="does not verify"):
        masking.unmask(fed.ctx[0], fed.keys[0], RUN, bad, fed.releases[0])
    # Holder 1's share handed to holder 0: sealed to another holder, it does not open.
    wrong = fed.coord.unmask_docs([0, 1, 2], fed.participants)[1]["shares"][2]
    misaddressed = dict(doc, shares=[wrong])
    with pytest.raises(MaskError, match="does not verify"):
        masking.unmask(fed.ctx[0], fed.keys[0], RUN, misaddressed, fed.releases[0])


def test_shares_that_rebuild_something_else_abort_the_round(ceremony):
    """A holder returns a wrong share: the rebuilt seed does not match the commitment in
    the owner's signed update, and the round is aborted rather than aggregated wrong."""
    fed = Federation(ceremony, 3)
    xs = fed.updates()
    cts = fed.send(xs, range(3))
    docs = fed.coord.unmask_docs([0, 1, 2], fed.participants)
    replies = {k: unpack_doc(masking.unmask(fed.ctx[k], fed.keys[k], RUN, docs[k], fed.releases[k]), "s")
               for k in range(3)}
    share = bytearray(bytes.fromhex(replies[0]["shares"][0]["share"]))
    share[-1] ^= 1
    replies[0]["shares"][0]["share"] = bytes(share).hex()
    replies[1]["shares"] = [s for s in replies[1]["shares"] if s["owner"] != replies[0]["shares"][0]["owner"]]
    with pytest.raises(RoundAborted, match="do not verify|cannot be removed"):
        fed.coord.correction(replies, SHAPE[0] * SHAPE[1], fed.t)
    assert cts  # nothing was aggregated


def test_an_institution_masks_once_per_epoch_and_only_with_a_neighbour(ceremony):
    fed = Federation(ceremony, 3)
    doc = fed.coord.train_doc(0, [0, 1, 2])
    masking.mask_update(fed.ctx[0], fed.keys[0], RUN, doc, SHAPE, fed.t, 1, "update")
    with pytest.raises(MaskError, match="mask twice"):
        masking.mask_update(fed.ctx[0], fed.keys[0], RUN, doc, SHAPE, fed.t, 1, "update")
    with pytest.raises(MaskError, match="share holders take part"):
        masking.mask_update(fed.ctx[1], fed.keys[1], RUN, dict(doc, participants=[1]), SHAPE,
                            fed.t, 1, "update")
    with pytest.raises(MaskError, match="no mask key"):
        masking.mask_update(fed.ctx[2], fed.keys[2], RUN, dict(doc, epoch=7), SHAPE, fed.t, 1, "update")
    with pytest.raises(MaskError, match="did not join"):
        masking.mask_update(fed.ctx[2], fed.keys[2], "a-third-run", doc, SHAPE, fed.t, 1, "update")


def test_settings_and_wire_format_refuse_bad_input():
    with pytest.raises(MaskError, match="he-mask-threshold=0.3: use a fraction"):
        MaskSettings(threshold=0.3)
    with pytest.raises(MaskError, match="he-mask-degree"):
        MaskSettings(degree=-1)
    assert unpack_doc(pack_doc({"a": 1}), "x") == {"a": 1}
    with pytest.raises(MaskError, match="lacks its shares"):
        unpack_doc(None, "shares")
    shares = masks.share_secret(b"s" * 32, [3, 5, 9], 2)
    assert masks.combine([shares[9], shares[3]], 2) == b"s" * 32
    with pytest.raises(MaskError, match="distinct shares"):
        masks.combine([shares[9], shares[9]], 2)
    assert masks.expand(b"k" * 32, 10, 97).max() < 97
    with pytest.raises(MaskError, match="X25519"):
        masks.agree(b"\0" * 32, b"\0" * 32)


def test_mask_settings_of_a_run_are_checked_with_the_fix(ceremony):
    from fedface.config import RunConfig

    for bad, match in [(dict(fraction_train=0.5), "fraction_train=0.5 with he_masks"),
                       (dict(he_mask_threshold=0.4), "he_mask_threshold=0.4"),
                       (dict(he_mask_degree=-2), "he_mask_degree=-2")]:
        with pytest.raises(ValueError, match=match):
            RunConfig(num_clients=4, he_keys=str(ceremony), **bad)
    RunConfig(num_clients=4, he_keys=str(ceremony), fraction_train=0.5, he_masks=False)
    # Masks change how updates travel, not what a round computes: same private seeds.
    a = RunConfig(num_clients=4, he_keys=str(ceremony))
    assert a.computation() == a.replace(he_masks=False, he_mask_degree=4).computation()
