"""crypto/signing.py and the signed key ceremony: each institution and the server sign
with their own Ed25519 key, and the tests play the adversaries a shared MAC key let
through (the server forging an institution's update, an institution forging an
aggregate), plus replays, unknown keys, the former HMAC layout and flipped bytes."""

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
from flwr.app import Array
from typer.testing import CliRunner

from crypto.envelope import VERSION, Envelope, EnvelopeError, open_envelope, seal_envelope, to_record
from crypto.keyfile import KeyFileError
from crypto.keys import (
    KeyBundleError,
    describe_keys,
    init_keys,
    load_client_keys,
    load_server_keys,
    rotate_keys,
    signers,
)
from crypto.packing import float_keys
from crypto.signing import (
    SIGNATURE_BYTES,
    SignatureError,
    key_fingerprint,
    new_signing_key,
    public_from_hex,
    public_hex,
    read_signing_key,
    sign,
    verify,
    write_signing_key,
)
from crypto.update import (
    AGGREGATE,
    SERVER,
    UPDATE,
    Quantization,
    add_updates,
    decrypt_aggregate,
    encrypt_update,
    open_update,
    prove_join,
    verify_join,
)

N = 3
RUN = "run-sig"
ROUND = 2
COUNTS = {"num_examples": 10, "train_steps": 3}


@pytest.fixture(scope="module")
def server_folder(ceremony, tmp_path_factory):
    """What the server is handed: a copy of DIR/server/ and nothing else."""
    d = tmp_path_factory.mktemp("coordinator") / "he"
    shutil.copytree(ceremony / "server", d)
    return d


@pytest.fixture(scope="module")
def server(server_folder):
    return load_server_keys(server_folder)


@pytest.fixture(scope="module")
def deltas():
    rng = np.random.default_rng(11)
    return [{"w": rng.uniform(-0.4, 0.4, (30, 20)).astype(np.float32)} for _ in range(N)]


def _update(keys, delta, server_round=ROUND, run=RUN):
    env, _ = encrypt_update(keys, delta, float_keys(delta), Quantization(), scale=1.0, run=run,
                            server_round=server_round, rng=np.random.default_rng(5), **COUNTS)
    return env


def _reseal(env, sign_key, **changes):
    """``env`` re-signed with ``sign_key``, its header fields changed (an adversary who
    knows the format and holds ``sign_key``)."""
    h = {**env.header, **changes}
    return seal_envelope(h["kind"], env.chunks, sign_key=sign_key, fingerprint=h["fingerprint"],
                         generation=h["generation"], params=h["params"], run=h["run"],
                         server_round=h["round"], sender=h["sender"], layout=h["layout"],
                         spec=h["spec"], meta=h["meta"])


def _private_hex(path):
    return path.read_text().split()[-1]


# ----------------------------------------------------------------------------- the module
def test_sign_and_verify_over_bytes(tmp_path):
    key = new_signing_key()
    sig = sign(key, b"mask-key advertisement")
    assert len(sig) == SIGNATURE_BYTES == 64
    assert sign(key, b"mask-key advertisement") == sig  # deterministic
    verify(key.public_key(), sig, b"mask-key advertisement", "an advertisement")
    for bad_sig, msg in ((sig, b"mask-key advertisemenT"), (sig[:-1], b"mask-key advertisement"),
                         (bytes(64), b"mask-key advertisement")):
        with pytest.raises(SignatureError, match="signature of an advertisement does not verify"):
            verify(key.public_key(), bad_sig, msg, "an advertisement")
    other = new_signing_key()
    with pytest.raises(SignatureError) as err:
        verify(other.public_key(), sig, b"mask-key advertisement", "an advertisement")
    assert key_fingerprint(other) in str(err.value)  # names the key it tried
    assert issubclass(SignatureError, ValueError)

    text = public_hex(key)
    assert len(text) == 64 and public_hex(public_from_hex(text)) == text == public_hex(key.public_key())
    for bad in ("zz" * 32, text[:-2], 42):
        with pytest.raises(SignatureError, match="not a 32-byte hex Ed25519 public key"):
            public_from_hex(bad)
    fp = key_fingerprint(key)
    assert len(fp) == 19 and fp.count(":") == 3 and fp == key_fingerprint(key.public_key())
    assert fp != key_fingerprint(other)


def test_private_key_file_is_owner_only_and_checked(tmp_path):
    key = new_signing_key()
    path = tmp_path / "k" / "sign.key"
    write_signing_key(path, key)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert path.read_text().startswith("fedface-signing-key v1\n")
    assert public_hex(read_signing_key(path)) == public_hex(key)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_signing_key(path)
    os.chmod(path, 0o600)
    path.write_text("fedface-scramble-key v1\n" + "00" * 32 + "\n")
    with pytest.raises(KeyFileError, match="not a fedface signing key"):
        read_signing_key(path)
    with pytest.raises(KeyFileError, match="does not exist"):
        read_signing_key(tmp_path / "none.key")


# ----------------------------------------------------------------------------- (a) forgery
def test_the_server_cannot_forge_an_institutions_update(ceremony, server_folder, server,
                                                        clients, deltas):
    """Adversary: the server, with its bundle (every public key, its own private key) and
    a genuine update of institution 1 in hand. It rewrites the update (another sample
    count, or its own chunks) and re-signs it under sender 1 with every key it holds:
    nothing verifies, because institution 1's private key is nowhere in its folder."""
    blob = b"".join(p.read_bytes() for p in server_folder.rglob("*") if p.is_file())
    for k in range(N):
        private = _private_hex(ceremony / "institutions" / f"client_{k:03d}" / "sign.key")
        assert private.encode() not in blob and bytes.fromhex(private) not in blob, k
    genuine = _update(clients[1], deltas[1])
    assert open_update(server, genuine, run=RUN, server_round=ROUND).header["sender"] == 1

    inflated = _reseal(genuine, server.sign_key,
                       meta={**genuine.meta, "num-examples": 10 ** 6})
    with pytest.raises(EnvelopeError, match="signature of sender 1 does not verify"):
        open_update(server, inflated, run=RUN, server_round=ROUND)
    other = _update(clients[2], deltas[2])  # institution 2's chunks, claimed as institution 1's
    swapped = _reseal(dataclasses.replace(genuine, chunks=other.chunks), server.sign_key,
                      chunks=other.header["chunks"])
    with pytest.raises(EnvelopeError, match="signature of sender 1 does not verify"):
        open_update(server, swapped, run=RUN, server_round=ROUND)
    # signed "as the server" it is not an institution's update at all
    as_server = _reseal(genuine, server.sign_key, sender=SERVER)
    with pytest.raises(EnvelopeError, match="unknown sender 'server'"):
        open_update(server, as_server, run=RUN, server_round=ROUND)
    # and the institutions, who check each other's envelopes with the same public keys,
    # refuse it too
    with pytest.raises(EnvelopeError, match="signature of sender 1 does not verify"):
        open_envelope(inflated, kind=UPDATE, fingerprint=clients[0].fingerprint,
                      verify_keys=clients[0].verify_keys, run=RUN, server_round=ROUND)

    # a join proof in institution 1's name, signed by the server, does not verify either
    proof = prove_join(dataclasses.replace(clients[1], sign_key=server.sign_key), run=RUN,
                       node=7, num_examples=10)
    with pytest.raises(EnvelopeError, match="claims ceremony index 1 but its proof does not"):
        verify_join(server, proof, run=RUN, node=7)
    assert verify_join(server, prove_join(clients[1], run=RUN, node=7, num_examples=10),
                       run=RUN, node=7) == (1, 10)


def test_an_institution_cannot_forge_an_aggregate(server, clients, deltas):
    """Adversary: institution 0, which holds the secret key, its own private key and every
    public key. It makes an 'aggregate' of its choice (here: institution 1's update alone,
    claimed to hold three senders) and signs it under sender 'server' with its own key:
    institution 2 refuses to decrypt it. Signed under its own index it is not from the
    server at all."""
    updates = [open_update(server, _update(clients[k], deltas[k]), run=RUN, server_round=ROUND)
               for k in range(N)]
    genuine = add_updates(server, updates, [1] * N, run=RUN, server_round=ROUND, max_units=16)
    mean, _ = decrypt_aggregate(clients[2], genuine, deltas[2], ["w"], run=RUN,
                                server_round=ROUND, min_senders=2)
    expected = sum(d["w"].astype(np.float64) for d in deltas) / N
    assert np.abs(mean["w"] - expected).max() < 1e-3

    lone = updates[1]
    forged = seal_envelope(AGGREGATE, lone.chunks, sign_key=clients[0].sign_key,
                           fingerprint=genuine.header["fingerprint"], generation=1,
                           params=genuine.header["params"], run=RUN, server_round=ROUND,
                           sender=SERVER, layout=genuine.header["layout"],
                           spec=genuine.header["spec"], meta=genuine.meta)
    with pytest.raises(EnvelopeError, match="signature of sender 'server' does not verify"):
        decrypt_aggregate(clients[2], forged, deltas[2], ["w"], run=RUN, server_round=ROUND)
    own = _reseal(forged, clients[0].sign_key, sender=0)
    with pytest.raises(EnvelopeError, match="unknown sender 0"):
        decrypt_aggregate(clients[2], own, deltas[2], ["w"], run=RUN, server_round=ROUND)
    # nor can it sign an update in institution 1's name
    as_one = _update(dataclasses.replace(clients[0], sender=1), deltas[0])
    with pytest.raises(EnvelopeError, match="signature of sender 1 does not verify"):
        open_update(server, as_one, run=RUN, server_round=ROUND)


# ----------------------------------------------------------------------------- (b) replay
def test_a_replayed_signed_envelope_or_join_proof_is_refused(server, clients, deltas):
    """Adversary: the network, which replays envelopes whose signatures are valid."""
    env = _update(clients[1], deltas[1])
    with pytest.raises(EnvelopeError, match=f"envelope of round {ROUND}, expected round "
                       f"{ROUND + 1}: replayed"):
        open_update(server, env, run=RUN, server_round=ROUND + 1)
    with pytest.raises(EnvelopeError, match="replayed from another run"):
        open_update(server, to_record(env), run="run-next", server_round=ROUND)
    updates = [open_update(server, _update(clients[k], deltas[k]), run=RUN, server_round=ROUND)
               for k in (1, 2)]
    agg = add_updates(server, updates, [1, 1], run=RUN, server_round=ROUND, max_units=16)
    with pytest.raises(EnvelopeError, match="replayed"):
        decrypt_aggregate(clients[0], agg, deltas[0], ["w"], run=RUN, server_round=ROUND + 1)
    with pytest.raises(EnvelopeError, match="another run"):
        decrypt_aggregate(clients[0], agg, deltas[0], ["w"], run="run-next", server_round=ROUND)
    # the header's round cannot be rewritten without the sender's key
    with pytest.raises(EnvelopeError, match="signature of sender 1 does not verify"):
        bumped = Envelope({**env.header, "round": ROUND + 1}, env.chunks, env.tag)
        open_update(server, bumped, run=RUN, server_round=ROUND + 1)
    # a join proof is bound to its run and node
    proof = prove_join(clients[2], run=RUN, node=9, num_examples=10)
    for run, node in (("run-next", 9), (RUN, 10)):
        with pytest.raises(EnvelopeError, match="proof does not verify"):
            verify_join(server, proof, run=run, node=node)
    with pytest.raises(EnvelopeError, match="proof does not verify"):
        verify_join(server, {**proof, "num-examples": 1000}, run=RUN, node=9)


# ----------------------------------------------------------------------------- (c) unknown keys
def test_a_signature_by_an_unknown_key_or_index_is_refused_naming_it(server, clients, deltas):
    stranger = new_signing_key()  # a node outside the ceremony
    env = _update(clients[1], deltas[1])
    outsider = _reseal(env, stranger, sender=7)
    with pytest.raises(EnvelopeError, match="unknown sender 7") as err:
        open_update(server, outsider, run=RUN, server_round=ROUND)
    assert "unknown key" in str(err.value)
    with pytest.raises(EnvelopeError, match="unknown sender 'mallory'"):
        open_update(server, _reseal(env, stranger, sender="mallory"), run=RUN, server_round=ROUND)
    # under a known index, the stranger's signature does not verify
    with pytest.raises(EnvelopeError, match="signature of sender 1 does not verify"):
        open_update(server, _reseal(env, stranger), run=RUN, server_round=ROUND)
    proof = prove_join(dataclasses.replace(clients[0], sender=7, sign_key=stranger), run=RUN,
                       node=3, num_examples=10)
    with pytest.raises(EnvelopeError, match="join proof of unknown index 7"):
        verify_join(server, proof, run=RUN, node=3)


# ----------------------------------------------------------------------------- (d) former layout
def test_the_former_hmac_layout_is_refused_with_the_rotate_hint(tmp_path):
    d = tmp_path / "keys"
    init_keys(d, clients=2)
    # make it look like the HMAC ceremony: mac.key files, MAC keys in the bundles
    for k in range(2):
        inst = d / "institutions" / f"client_{k:03d}"
        (inst / "sign.key").unlink()
        (inst / "mac.key").write_text("ab" * 32)
        os.chmod(inst / "mac.key", 0o600)
    (d / "server" / "sign.key").unlink()
    sb = json.loads((d / "server" / "bundle.json").read_text())
    del sb["sign_public"], sb["role"]
    sb.update(server_mac="cd" * 32, client_macs={"0": "ab" * 32, "1": "ef" * 32})
    (d / "server" / "bundle.json").write_text(json.dumps(sb))
    hint = f"`fedface keys rotate {re.escape(str(d))}`"
    with pytest.raises(KeyBundleError, match="former layout .*" + hint):
        load_client_keys(d, 1)
    with pytest.raises(KeyBundleError, match=hint):
        load_server_keys(d)
    node = tmp_path / "node1"  # a deployed copy of an institution's folder
    shutil.copytree(d / "institutions" / "client_001", node)
    with pytest.raises(KeyBundleError, match="`fedface keys rotate DIR` on the key ceremony"):
        load_client_keys(node, 1)
    # an old bundle next to a sign.key is refused too (MAC fields in the bundle)
    inst = d / "institutions" / "client_000"
    write_signing_key(inst / "sign.key", new_signing_key())
    cb = json.loads((inst / "bundle.json").read_text())
    cb["server_mac"] = "cd" * 32
    (inst / "bundle.json").write_text(json.dumps(cb))
    with pytest.raises(KeyBundleError, match="keys rotate"):
        load_client_keys(d, 0)
    assert "server_mac" not in describe_keys(d / "server")  # no MAC key is ever shown
    # the hint works: rotation makes signing key pairs and retires the old generation
    desc = rotate_keys(d)
    assert desc["generation"] == 2 and set(desc["sign_public"]) == {"0", "1", "server",
                                                                              "querier"}
    assert (d / "retired" / "gen-1" / "server" / "bundle.json").exists()
    keys = load_client_keys(d, 1)
    assert public_hex(load_server_keys(d).verify_keys[1]) == public_hex(keys.sign_key)


def test_rotation_renews_every_signing_key_pair(tmp_path, deltas):
    d = tmp_path / "keys"
    init_keys(d, clients=2)
    old_client, old_server = load_client_keys(d, 0), load_server_keys(d)
    env = _update(old_client, deltas[0])
    rotate_keys(d)
    new_client, new_server = load_client_keys(d, 0), load_server_keys(d)
    assert public_hex(new_client.sign_key) != public_hex(old_client.sign_key)
    assert public_hex(new_server.sign_key) != public_hex(old_server.sign_key)
    assert public_hex(new_client.server_verify_key) == public_hex(new_server.sign_key)
    with pytest.raises(EnvelopeError, match="another key"):
        open_update(new_server, env, run=RUN, server_round=ROUND)
    # a signing key of another ceremony next to this bundle is named
    shutil.copy(d / "retired" / "gen-1" / "institutions" / "client_000" / "sign.key",
                d / "institutions" / "client_000" / "sign.key")
    with pytest.raises(KeyBundleError, match="is not the signing key of institution 0"):
        load_client_keys(d, 0)
    shutil.copy(d / "retired" / "gen-1" / "server" / "sign.key", d / "server" / "sign.key")
    with pytest.raises(KeyBundleError, match="is not the signing key of the server"):
        load_server_keys(d)


# ----------------------------------------------------------------------------- (e) flipped bytes
def test_a_flipped_byte_in_a_ciphertext_header_or_signature_fails(server, clients, deltas):
    env = _update(clients[1], deltas[1])
    assert env.header["version"] == VERSION == 2
    chunk = bytearray(env.chunks[0])
    chunk[len(chunk) // 2] ^= 0x01
    with pytest.raises(EnvelopeError, match="ciphertext 0 .* does not match its header"):
        open_update(server, Envelope(env.header, [bytes(chunk), *env.chunks[1:]], env.tag),
                    run=RUN, server_round=ROUND)
    sig = bytearray(env.tag)
    sig[5] ^= 0x80
    with pytest.raises(EnvelopeError, match="signature of sender 1 does not verify"):
        open_update(server, Envelope(env.header, env.chunks, bytes(sig)), run=RUN,
                    server_round=ROUND)
    rec = to_record(env)  # a byte of the header flipped on the wire
    raw = bytearray(rec["header"].numpy().tobytes())
    at = raw.index(env.header["chunks"][0][1].encode())  # a hex digit of chunk 0's SHA-256
    raw[at] = ord("0") if raw[at] != ord("0") else ord("1")
    rec["header"] = Array(np.frombuffer(bytes(raw), np.uint8).copy())
    with pytest.raises(EnvelopeError, match="does not verify"):
        open_update(server, rec, run=RUN, server_round=ROUND)


# ----------------------------------------------------------------------------- what is shown
def test_descriptions_and_keys_show_name_the_signers_and_no_private_key(ceremony, clients):
    from fedface.cli import app

    privates = [_private_hex(p) for p in sorted(ceremony.rglob("sign.key"))]
    assert len(privates) == N + 2  # the institutions', the server's and the querier's
    for where in (ceremony, ceremony / "server", ceremony / "institutions" / "client_001"):
        text = json.dumps(describe_keys(where))
        assert not any(p in text for p in privates), where
    rows = signers(describe_keys(ceremony))
    assert [who for who, _, _ in rows] == ["institution 0", "institution 1", "institution 2",
                                           "the server", "the analytics querier"]
    assert rows[1] == ("institution 1", key_fingerprint(clients[1].sign_key),
                       "institutions/client_001/sign.key")
    assert rows[-2][2] == "server/sign.key" and rows[-1][2] == "querier/sign.key"
    res = CliRunner().invoke(app, ["keys", "show", str(ceremony)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for _, fp, private in rows:
        assert fp in res.output and private in res.output
    assert not any(p in res.output for p in privates)
