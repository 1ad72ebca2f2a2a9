"""crypto/: key ceremony, server without secret, rotation, packing, encrypted sums, envelopes."""

import json
import math
import os
import shutil
import stat

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from crypto.context import BadCiphertext, HEContext, HEParams, MissingSecretKey
from crypto.envelope import Envelope, EnvelopeError, from_record, open_envelope, seal_envelope, to_record
from crypto.keys import (
    KeyBundleError,
    describe_keys,
    init_keys,
    load_client_keys,
    load_querier_key,
    load_server_keys,
    rotate_keys,
)
from crypto.packing import (
    dequantize_sum,
    error_bound,
    float_keys,
    make_layout,
    pack,
    quantize,
    unpack,
)
from crypto.signing import public_hex
from crypto.update import (
    AGGREGATE,
    SERVER,
    UPDATE,
    Quantization,
    add_updates,
    aggregate_error_bound,
    decrypt_aggregate,
    encrypt_update,
    open_update,
)
from tests.fakes import Reply

N = 5
RUN = "run-0123"
ROUND = 3
SHAPES = {"w": (40, 300), "b": (17,)}
N_VALUES = 40 * 300 + 17  # two ciphertexts at 8192 values each
COUNTS = {"num_examples": 10, "train_steps": 3}  # authenticated in every update's header


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _delta(rng, amp=0.45):
    """A backbone update: two float arrays and an integer buffer in between (not federated)."""
    return {"w": rng.uniform(-amp, amp, SHAPES["w"]).astype(np.float32),
            "bn.num_batches_tracked": np.array(rng.integers(1, 1000), dtype=np.int64),
            "b": rng.uniform(-amp, amp, SHAPES["b"]).astype(np.float32)}


def _copy(env):
    return Envelope(header=json.loads(json.dumps(env.header)), chunks=list(env.chunks), tag=env.tag)


def _open(server, env, **kw):
    args = {"run": RUN, "server_round": ROUND, **kw}
    return open_update(server, env, **args)


@pytest.fixture(scope="module")
def server(ceremony):
    return load_server_keys(ceremony)


@pytest.fixture(scope="module")
def deltas():
    rng = np.random.default_rng(7)
    return [_delta(rng) for _ in range(N)]


@pytest.fixture(scope="module")
def update(clients, deltas):
    """Client 1's update envelope of round ROUND (two ciphertexts)."""
    env, _ = encrypt_update(clients[1], deltas[1], float_keys(deltas[1]), Quantization(), scale=0.5,
                            run=RUN, server_round=ROUND, rng=np.random.default_rng(1), **COUNTS)
    assert len(env.chunks) == 2
    return env


# ----------------------------------------------------------------------------- ceremony
def test_ceremony_writes_owner_only_files_and_one_fingerprint(tmp_path):
    d = tmp_path / "keys"
    public = init_keys(d, clients=3)
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert files == [f"institutions/client_{k:03d}/{f}" for k in range(3)
                     for f in ("bundle.json", "secret.key", "sign.key")] + [
        "key.json", "querier/sign.key", "server/bundle.json", "server/sign.key"]
    for f in files:
        if f != "key.json":  # key.json is the public description
            assert _mode(d / f) == 0o600, f
    for folder in (d, d / "institutions", d / "server", d / "querier",
                   *(d / "institutions" / f"client_{k:03d}" for k in range(3))):
        assert _mode(folder) == 0o700, folder

    key = json.loads((d / "key.json").read_text())
    cb = json.loads((d / "institutions" / "client_001" / "bundle.json").read_text())
    sb = json.loads((d / "server" / "bundle.json").read_text())
    fp = key["fingerprint"]
    assert len(fp) == 19 and fp.count(":") == 3
    assert fp == cb["fingerprint"] == sb["fingerprint"] == public["fingerprint"]
    assert key["generation"] == cb["generation"] == sb["generation"] == 1
    assert key["clients"] == 3 and key["params"] == HEParams().to_dict()
    ck = [load_client_keys(d, k) for k in range(3)]
    sk = load_server_keys(d)
    assert {c.fingerprint for c in ck} == {sk.fingerprint} == {fp}
    # each institution its own signing key; everyone holds every public key
    own = [public_hex(c.sign_key) for c in ck]
    assert len(set(own)) == 3 and public_hex(sk.sign_key) not in own
    assert {k: public_hex(v) for k, v in sk.verify_keys.items()} == dict(enumerate(own))
    for c in ck:
        assert {k: public_hex(v) for k, v in c.verify_keys.items()} == dict(enumerate(own))
        assert public_hex(c.server_verify_key) == public_hex(sk.sign_key)
    assert key["sign_public"] == cb["sign_public"] == sb["sign_public"]
    querier = public_hex(load_querier_key(d))
    assert querier not in own and querier != public_hex(sk.sign_key)
    assert key["sign_public"] == {**{str(k): h for k, h in enumerate(own)},
                                  "server": public_hex(sk.sign_key), "querier": querier}
    assert all(public_hex(c.querier_verify_key) == querier for c in ck)
    assert [c.sender for c in ck] == [0, 1, 2]
    assert cb["sender"] == 1
    with pytest.raises(KeyBundleError, match="no keys of institution 3"):
        load_client_keys(d, 3)

    # the public description holds no secret, whichever folder it is read from
    secrets_hex = [(d / f).read_text().split()[-1] for f in files if f.endswith("sign.key")]
    assert len(secrets_hex) == 5 and all(len(h) == 64 for h in secrets_hex)
    secret_key = (d / "institutions" / "client_000" / "secret.key").read_bytes()
    assert all((d / "institutions" / f"client_{k:03d}" / "secret.key").read_bytes() == secret_key
               for k in range(3))  # one secret key, shared by the institutions
    for where in (d, d / "institutions" / "client_002", d / "server"):
        desc = describe_keys(where)
        text = json.dumps(desc)
        assert desc["fingerprint"] == fp
        assert "server_mac" not in desc and "client_macs" not in desc
        assert desc["sign_public"] == key["sign_public"]  # public keys: fine
        assert not any(h in text for h in secrets_hex)
        assert secret_key.hex()[:64] not in text
    with pytest.raises(KeyBundleError, match="no keys"):
        describe_keys(tmp_path)


def test_ceremony_refuses_to_overwrite_unless_forced(tmp_path):
    d = tmp_path / "keys"
    first = init_keys(d, clients=2)
    with pytest.raises(KeyBundleError, match="already holds keys"):
        init_keys(d, clients=2)
    assert describe_keys(d)["fingerprint"] == first["fingerprint"]
    second = init_keys(d, clients=2, force=True)
    assert second["fingerprint"] != first["fingerprint"]
    assert load_server_keys(d).fingerprint == load_client_keys(d, 1).fingerprint == second["fingerprint"]
    with pytest.raises(KeyBundleError, match="at least one"):
        init_keys(tmp_path / "none", clients=0)


@pytest.mark.parametrize("path,loader", [
    ("institutions/client_000/secret.key", "client"),
    ("institutions/client_000/bundle.json", "client"),
    ("institutions/client_000/sign.key", "client"),
    ("server/sign.key", "server"),
    ("server/bundle.json", "server"),
])
def test_key_file_readable_by_others_is_refused(tmp_path, path, loader):
    d = tmp_path / "keys"
    init_keys(d, clients=1)
    os.chmod(d / path, 0o644)
    load = (lambda: load_client_keys(d, 0)) if loader == "client" else (lambda: load_server_keys(d))
    with pytest.raises(KeyBundleError, match="chmod 600") as err:
        load()
    assert str(d / path) in str(err.value) and "0o644" in str(err.value)
    os.chmod(d / path, 0o600)
    load()


def test_secret_key_of_another_ceremony_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    init_keys(a, clients=1)
    init_keys(b, clients=1)
    shutil.copy(b / "institutions" / "client_000" / "secret.key",
                a / "institutions" / "client_000" / "secret.key")
    with pytest.raises(KeyBundleError, match="does not belong to this bundle"):
        load_client_keys(a, 0)


def test_deployment_copy_of_the_institution_folder(ceremony, server, tmp_path):
    node = tmp_path / "node2"
    shutil.copytree(ceremony / "institutions" / "client_002", node)
    keys = load_client_keys(node, 2)
    assert keys.fingerprint == server.fingerprint
    assert public_hex(keys.sign_key) == public_hex(server.verify_keys[2])
    assert keys.clients == N
    with pytest.raises(KeyBundleError, match="keys of institution 2, not of institution 1"):
        load_client_keys(node, 1)  # a wrong he-sender is named


# ----------------------------------------------------------------------------- server side
def test_server_holds_no_secret_and_cannot_decrypt(ceremony, server, clients):
    assert server.context.has_secret_key is False
    assert clients[0].context.has_secret_key is True
    blobs = clients[0].context.encrypt(np.ones((1, 4096), np.uint64))
    with pytest.raises(MissingSecretKey, match="cannot decrypt"):
        server.context.decrypt(blobs)
    with pytest.raises(MissingSecretKey, match="cannot encrypt"):
        server.context.encrypt(np.ones((1, 4096), np.uint64))
    with pytest.raises(MissingSecretKey):
        server.context.noise_budget(blobs[0])
    assert issubclass(MissingSecretKey, PermissionError)
    # the server can still add (and scale) what it cannot read
    summed = server.context.weighted_sum([blobs, blobs], [1, 2])
    assert np.all(clients[0].context.decrypt(summed) == 3)

    server_files = [p for p in (ceremony / "server").rglob("*") if p.is_file()]
    assert sorted(p.name for p in server_files) == ["bundle.json", "sign.key"]
    secret = (ceremony / "institutions" / "client_000" / "secret.key").read_bytes()
    for f in server_files:
        blob = f.read_bytes()
        assert secret[-64:] not in blob and secret[-64:].hex().encode() not in blob


def test_bundles_are_not_interchangeable(ceremony):
    with pytest.raises(KeyBundleError, match="holds a client bundle"):
        load_server_keys(ceremony / "institutions" / "client_000")
    with pytest.raises(KeyBundleError, match="holds the server bundle"):
        load_client_keys(ceremony / "server", 0)
    with pytest.raises(KeyBundleError, match="missing"):
        load_server_keys(ceremony / "nowhere")


# ----------------------------------------------------------------------------- rotation
def test_rotation_retires_the_generation_and_rejects_its_updates(tmp_path, deltas):
    d = tmp_path / "keys"
    first = init_keys(d, clients=2)
    old_client, old_server = load_client_keys(d, 0), load_server_keys(d)
    second = rotate_keys(d)
    assert second["generation"] == 2 and describe_keys(d)["generation"] == 2
    assert second["fingerprint"] != first["fingerprint"]
    retired = d / "retired" / "gen-1"
    assert (retired / "key.json").exists() and (retired / "server" / "bundle.json").exists()
    sk = "institutions/client_000/secret.key"
    assert _mode(retired) == 0o700 and _mode(retired / sk) == 0o600
    assert describe_keys(retired)["fingerprint"] == first["fingerprint"]
    assert (retired / sk).read_bytes() != (d / sk).read_bytes()
    assert load_client_keys(retired, 0).fingerprint == first["fingerprint"]

    new_client, new_server = load_client_keys(d, 0), load_server_keys(d)
    assert (new_client.generation, new_server.generation) == (2, 2)
    assert new_server.fingerprint == second["fingerprint"]
    keys = float_keys(deltas[0])
    kw = {"scale": 1.0, "run": RUN, "server_round": ROUND, "rng": np.random.default_rng(0), **COUNTS}
    stale, _ = encrypt_update(old_client, deltas[0], keys, Quantization(), **kw)
    with pytest.raises(EnvelopeError, match="another key") as err:
        _open(new_server, stale)
    assert "generation 1" in str(err.value) and second["fingerprint"] in str(err.value)
    fresh, _ = encrypt_update(new_client, deltas[0], keys, Quantization(), **kw)
    with pytest.raises(EnvelopeError, match="another key"):
        _open(old_server, fresh)
    agg = add_updates(new_server, [_open(new_server, fresh)], [1], run=RUN, server_round=ROUND,
                      max_units=16)
    with pytest.raises(EnvelopeError, match="another key"):  # an old node cannot read the new aggregate
        decrypt_aggregate(old_client, agg, deltas[0], keys, run=RUN, server_round=ROUND)
    mean, _ = decrypt_aggregate(new_client, agg, deltas[0], keys, run=RUN, server_round=ROUND)
    assert np.abs(mean["w"] - deltas[0]["w"]).max() < aggregate_error_bound(agg)


# ----------------------------------------------------------------------------- packing
def test_layout_fits_digits_and_names_he_bits_when_it_cannot():
    lay = make_layout(N_VALUES, 15, 0.5, max_clients=16, max_multiplier=1, slots=4096, plain_bits=40)
    assert (lay.digit_bits, lay.digits) == (19, 2)
    assert lay.values_per_ciphertext == 8192 and lay.ciphertexts == 2
    assert lay.step == pytest.approx(1.0 / 32767)
    # 16 clients x multipliers up to 4 need 6 bits of headroom: 21-bit digits, one per slot
    assert make_layout(10, 15, 0.5, 16, 4, 4096, 40).digits == 1
    assert make_layout(10, 8, 0.5, 5, 1, 4096, 40).digit_bits == 11  # ceil(log2 5) = 3
    assert make_layout(10, 15, 0.5, 1, 1, 4096, 40).digit_bits == 15  # one client: no headroom
    with pytest.raises(ValueError, match="he_bits") as err:
        make_layout(10, 30, 0.5, 1024, 1, 4096, 40)  # 30 + 10 bits > 39 usable
    assert "10 bits of headroom" in str(err.value)
    with pytest.raises(ValueError, match="he_bits"):
        make_layout(10, 31, 0.5, 1, 1, 4096, 40)
    with pytest.raises(ValueError, match="he_clip"):
        make_layout(10, 15, 0.0, 1, 1, 4096, 40)
    with pytest.raises(ValueError, match="he_max_clients"):
        make_layout(10, 15, 0.5, 0, 1, 4096, 40)


def test_pack_unpack_round_trip_and_headroom_holds_the_largest_sum():
    rng = np.random.default_rng(0)
    lay = make_layout(20000, 15, 0.5, 16, 1, 4096, 40)  # 3 ciphertexts, the last one partly used
    codes = rng.integers(0, 2 ** 15, 20000).astype(np.uint64)
    slots = pack(codes, lay)
    assert slots.shape == (3, 4096) and slots.dtype == np.uint64
    np.testing.assert_array_equal(unpack(slots, lay), codes)
    # codes from quantize survive too
    q, _ = quantize(rng.uniform(-0.5, 0.5, 20000), lay, rng)
    np.testing.assert_array_equal(unpack(pack(q, lay), lay), q)
    # 16 clients at the largest code: the digits never carry and the slot stays below t
    top = np.full(20000, 2 ** 15 - 1, np.uint64)
    total = sum(pack(top, lay) for _ in range(16))
    assert int(total.max()) < 2 ** 39
    np.testing.assert_array_equal(unpack(total, lay), top * np.uint64(16))
    mixed = [rng.integers(0, 2 ** 15, 20000).astype(np.uint64) for _ in range(16)]
    np.testing.assert_array_equal(unpack(sum(pack(c, lay) for c in mixed), lay), sum(mixed))


def test_stochastic_rounding_is_unbiased_and_within_one_step():
    lay = make_layout(200_000, 4, 1.0, 1, 1, 4096, 40)  # coarse grid: step 2/15
    x0 = -1.0 + 3.3 * lay.step  # 0.3 of a step above a grid point
    x = np.full(lay.length, x0)
    codes, clipped = quantize(x, lay, np.random.default_rng(5))
    assert clipped == 0.0 and set(np.unique(codes).tolist()) == {3, 4}
    err = codes.astype(np.float64) * lay.step - lay.clip - x
    assert np.abs(err).max() < lay.step
    # floor/round would be 0.3 step off; the mean error's std is ~0.46 step / sqrt(200k) = 0.001 step
    assert abs(err.mean()) < 0.005 * lay.step
    assert np.mean(codes == 4) == pytest.approx(0.3, abs=0.005)
    # random values on the real grid: every error below one step
    lay15 = make_layout(50_000, 15, 0.5, 16, 1, 4096, 40)
    rng = np.random.default_rng(6)
    v = rng.uniform(-0.5, 0.5, lay15.length)
    q, _ = quantize(v, lay15, rng)
    e = q.astype(np.float64) * lay15.step - 0.5 - v
    assert np.abs(e).max() < lay15.step and abs(e.mean()) < 0.01 * lay15.step


def test_quantize_refuses_nan_and_reports_clipping():
    lay = make_layout(5, 15, 0.5, 16, 1, 4096, 40)
    rng = np.random.default_rng(0)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN"):
            quantize(np.array([0.0, bad, 0.1, 0.2, 0.3]), lay, rng)
    codes, clipped = quantize(np.array([-1.0, -0.5, 0.0, 0.5, 0.7]), lay, rng)
    assert clipped == pytest.approx(0.4)
    assert codes[0] == 0 and codes[-1] == 2 ** 15 - 1  # clipped to the ends of the range
    assert codes[3] == 2 ** 15 - 1 and codes[1] == 0
    with pytest.raises(ValueError, match="does not match the layout"):
        quantize(np.zeros(6), lay, rng)
    # decoding: sums of codes back to the weighted mean
    sums = np.array([0, 2 ** 15 - 1, 2 * (2 ** 15 - 1)], np.uint64)
    np.testing.assert_allclose(dequantize_sum(sums, lay, 2.0, 1.0), [-1.0, 0.0, 1.0], atol=1e-6)
    assert error_bound(lay, 4.0, 2.0) == pytest.approx(2 * lay.step)


# ----------------------------------------------------------------------------- end to end
def _round(clients, server, deltas, scales, multipliers, quant, senders=None, seed=11):
    senders = list(range(len(clients))) if senders is None else senders
    keys = float_keys(deltas[0])
    assert keys == ["w", "b"]  # the integer buffer is not federated
    rng = np.random.default_rng(seed)
    opened, reports = [], []
    for k in senders:
        env, report = encrypt_update(clients[k], deltas[k], keys, quant, scale=scales[k], run=RUN,
                                     server_round=ROUND, rng=rng, **COUNTS)
        reports.append(report)
        opened.append(open_update(server, to_record(env), run=RUN, server_round=ROUND))
    mult = [multipliers[k] for k in senders]
    agg = add_updates(server, opened, mult, run=RUN, server_round=ROUND,
                      max_units=quant.max_clients * quant.max_multiplier, meta={"lr": 0.1})
    assert agg.header["kind"] == AGGREGATE and agg.header["sender"] == SERVER
    mean, env = decrypt_aggregate(clients[senders[0]], to_record(agg), deltas[0], keys, run=RUN,
                                  server_round=ROUND)
    weight = sum(mult[i] * scales[k] for i, k in enumerate(senders))
    expected = {key: sum(mult[i] * scales[k] * deltas[k][key].astype(np.float64)
                         for i, k in enumerate(senders)) / weight for key in keys}
    assert env.meta["senders"] == senders and env.meta["count"] == len(senders)
    assert env.meta["multipliers"] == mult and env.meta["multiplier_sum"] == sum(mult)
    assert env.meta["weight_sum"] == pytest.approx(weight) and env.meta["lr"] == 0.1
    assert all(r["clipped"] == 0.0 for r in reports)
    assert [r["scale"] for r in reports] == [scales[k] for k in senders]
    return mean, expected, env, mult, weight


@pytest.mark.parametrize("multipliers,quant", [
    ([1, 1, 1, 1, 1], Quantization()),
    ([1, 3, 2, 1, 4], Quantization(bits=14, max_clients=4, max_multiplier=4)),  # 19-bit digits
])
def test_encrypted_sum_decodes_to_the_weighted_mean(clients, server, deltas, multipliers, quant):
    scales = [1.0, 0.25, 0.6, 0.9, 0.05]
    mean, expected, env, mult, weight = _round(clients, server, deltas, scales, multipliers, quant)
    assert set(mean) == {"w", "b"}
    assert all(mean[k].dtype == np.float32 and mean[k].shape == SHAPES[k] for k in mean)
    layout = make_layout(N_VALUES, quant.bits, quant.clip, quant.max_clients, quant.max_multiplier,
                         4096, 40)
    assert env.header["layout"] == layout.to_dict() and layout.digits == 2
    bound = aggregate_error_bound(env)
    assert bound == pytest.approx(layout.step * sum(mult) / weight)
    err = np.concatenate([(mean[k] - expected[k]).ravel() for k in ("w", "b")])
    assert np.abs(err).max() < bound
    # stochastic rounding: error std at most step/2 per client, added with the multipliers
    rms_cap = 0.5 * layout.step * math.sqrt(sum(m * m for m in mult)) / weight
    assert np.sqrt(np.mean(err ** 2)) < rms_cap
    assert abs(err.mean()) < 0.05 * rms_cap
    assert np.abs(np.concatenate([expected[k].ravel() for k in expected])).max() > 100 * bound


def test_dropouts_sum_exactly_the_clients_that_replied(clients, server, deltas):
    scales = [1.0, 0.25, 0.6, 0.9, 0.05]
    mean, expected, env, mult, weight = _round(clients, server, deltas, scales, [1] * N, Quantization(),
                                               senders=[0, 2, 4])
    assert env.meta["senders"] == [0, 2, 4] and weight == pytest.approx(1.65)
    bound = aggregate_error_bound(env)
    for k in ("w", "b"):
        assert np.abs(mean[k] - expected[k]).max() < bound
    # and not the mean of all five
    everyone = sum(s * d["w"].astype(np.float64) for s, d in zip(scales, deltas)) / sum(scales)
    assert np.abs(mean["w"] - everyone).max() > 100 * bound


def test_encrypted_update_costs_about_its_float32_bytes(clients):
    n = 100_000
    delta = {"v": np.random.default_rng(0).normal(0, 0.05, n).astype(np.float32)}
    env, _ = encrypt_update(clients[0], delta, ["v"], Quantization(), scale=1.0, run=RUN,
                            server_round=1, rng=np.random.default_rng(1), **COUNTS)
    assert len(env.chunks) == math.ceil(n / 8192) == 13
    ratio = env.nbytes / (4 * n)
    assert ratio < 1.1, ratio
    # seeded ciphertexts: one polynomial each, about the 32 KiB of the 8192 floats they hold
    assert all(len(c) < 1.05 * 4 * 8192 for c in env.chunks)


# ----------------------------------------------------------------------------- envelopes
def test_record_round_trip_keeps_the_envelope(server, update):
    rec = to_record(update)
    assert isinstance(rec, ArrayRecord)
    assert sorted(rec) == ["ct-00000", "ct-00001", "header", "tag"]
    back = from_record(rec)
    assert back.header == update.header and back.chunks == update.chunks and back.tag == update.tag
    assert back.header["sender"] == 1 and back.meta["scale"] == 0.5
    opened = _open(server, rec)
    assert opened.header["round"] == ROUND and opened.header["generation"] == 1


def _reject(server, env_or_record, *substrings, **kw):
    with pytest.raises(EnvelopeError) as err:
        _open(server, env_or_record, **kw)
    msg = str(err.value)
    assert any(s in msg for s in substrings), msg
    return msg


def test_tampered_truncated_and_dropped_chunks_are_rejected(server, update):
    env = _copy(update)
    flipped = bytearray(env.chunks[1])
    flipped[len(flipped) // 2] ^= 0x01
    env.chunks[1] = bytes(flipped)
    assert "ciphertext 1" in _reject(server, env, "tampered", "truncated")

    rec = to_record(update)  # tampering with the Flower record itself
    raw = rec["ct-00000"].numpy().copy()
    raw[100] ^= 0xFF
    rec["ct-00000"] = Array(raw)
    assert "ciphertext 0" in _reject(server, rec, "tampered")

    env = _copy(update)
    env.chunks[0] = env.chunks[0][:-16]
    _reject(server, env, "truncated")

    env = _copy(update)
    env.chunks = env.chunks[:1]
    msg = _reject(server, env, "truncated in transit")
    assert "holds 1 ciphertexts" in msg and "lists 2" in msg

    env = _copy(update)
    env.chunks = env.chunks[::-1]
    _reject(server, env, "tampered")


def test_modified_header_replay_and_other_runs_are_rejected(server, update):
    for field, value in (("round", ROUND + 1), ("meta", {"scale": 1.0}), ("run", "other"),
                         ("kind", AGGREGATE)):
        env = _copy(update)
        env.header[field] = value
        msg = _reject(server, env, "does not verify", server_round=int(env.header["round"]),
                      run=env.header["run"])
        assert "tampered" in msg
    rec = to_record(update)  # header edited inside the record
    header = json.loads(rec["header"].numpy().tobytes())
    header["round"] = ROUND + 1
    rec["header"] = Array(np.frombuffer(json.dumps(header).encode(), np.uint8).copy())
    _reject(server, rec, "does not verify", server_round=ROUND + 1)
    rec["header"] = Array(np.frombuffer(b"{not json", np.uint8).copy())
    with pytest.raises(EnvelopeError, match="not valid JSON"):
        from_record(rec)

    msg = _reject(server, update, "replayed", server_round=ROUND + 1)
    assert f"round {ROUND}" in msg
    _reject(server, update, "another run", run="run-other")
    # an update offered where an aggregate is expected
    with pytest.raises(EnvelopeError, match="expected a 'aggregate' envelope, got 'update'"):
        open_envelope(update, kind=AGGREGATE, fingerprint=server.fingerprint,
                      verify_keys=server.verify_keys,
                      run=RUN, server_round=ROUND)
    env = _copy(update)
    env.header["version"] = 1  # an HMAC-tagged envelope of an older fedface
    assert "the peer runs an older fedface" in _reject(server, env, "version 1")
    env.header["version"] = 3
    _reject(server, env, "upgrade fedface on both sides")


def test_senders_outside_the_ceremony_or_impersonating_are_rejected(server, clients, update, deltas):
    with pytest.raises(EnvelopeError, match="unknown sender 1"):
        open_envelope(update, kind=UPDATE, fingerprint=server.fingerprint,
                      verify_keys={0: server.verify_keys[0]}, run=RUN, server_round=ROUND)
    env = _copy(update)
    env.header["sender"] = 99
    _reject(server, env, "unknown sender 99")
    # client 0 signs with its own key but claims to be client 1
    forged = seal_envelope(UPDATE, update.chunks, sign_key=clients[0].sign_key,
                           fingerprint=server.fingerprint, generation=1, params=update.header["params"],
                           run=RUN, server_round=ROUND, sender=1, layout=update.header["layout"],
                           spec=update.header["spec"], meta=update.meta)
    _reject(server, forged, "does not verify")
    # a client cannot take an update for an aggregate (it is not signed by the server)
    with pytest.raises(EnvelopeError, match="unknown sender 1"):
        decrypt_aggregate(clients[0], update, deltas[1], float_keys(deltas[1]), run=RUN,
                          server_round=ROUND)


def test_envelope_of_another_ceremony_or_without_header_is_rejected(server, deltas, tmp_path):
    init_keys(tmp_path / "other", clients=N)
    stranger = load_client_keys(tmp_path / "other", 1)
    env, _ = encrypt_update(stranger, deltas[1], float_keys(deltas[1]), Quantization(), scale=1.0,
                            run=RUN, server_round=ROUND, rng=np.random.default_rng(0), **COUNTS)
    msg = _reject(server, to_record(env), "another key")
    assert stranger.fingerprint in msg and server.fingerprint in msg

    plain = ArrayRecord({"w": Array(deltas[0]["w"])})
    for rec in (plain, ArrayRecord({"ct-00000": Array(np.zeros(8, np.uint8))}), ArrayRecord()):
        with pytest.raises(EnvelopeError, match="not an encrypted envelope"):
            _open(server, rec)


# ----------------------------------------------------------------------------- refusals
def test_garbage_ciphertexts_raise_bad_ciphertext(server, update):
    rng = np.random.default_rng(0)
    for blob in (b"", b"garbage" * 20, rng.bytes(5000), update.chunks[0][:200], update.chunks[0][:-1]):
        with pytest.raises(BadCiphertext):
            server.context.load(blob)
    assert issubclass(BadCiphertext, ValueError)
    other = HEContext(HEParams(plain_bits=30, coeff_bits=50))
    with pytest.raises(BadCiphertext):
        other.load(update.chunks[0])


def test_add_updates_refuses_overflowing_multipliers_and_mixed_layouts(clients, server, deltas, update):
    a = _open(server, update)
    keys = float_keys(deltas[0])
    kw = {"scale": 1.0, "run": RUN, "server_round": ROUND, **COUNTS}
    b, _ = encrypt_update(clients[2], deltas[2], keys, Quantization(), rng=np.random.default_rng(2), **kw)
    with pytest.raises(EnvelopeError, match="he-max-clients"):
        add_updates(server, [a, b], [10, 7], run=RUN, server_round=ROUND, max_units=16)
    add_updates(server, [a, b], [10, 6], run=RUN, server_round=ROUND, max_units=16)  # exactly 16 fits
    with pytest.raises(ValueError, match="positive integers"):
        add_updates(server, [a, b], [1, 0], run=RUN, server_round=ROUND, max_units=16)
    with pytest.raises(ValueError, match="no updates"):
        add_updates(server, [], [], run=RUN, server_round=ROUND, max_units=16)

    other_bits, _ = encrypt_update(clients[2], deltas[2], keys, Quantization(bits=14),
                                   rng=np.random.default_rng(2), **kw)
    with pytest.raises(EnvelopeError, match="different layouts"):
        add_updates(server, [a, other_bits], [1, 1], run=RUN, server_round=ROUND, max_units=16)
    # same number of values, another model (spec differs)
    transposed = {"w": deltas[2]["w"].T.copy(), "b": deltas[2]["b"]}
    other_model, _ = encrypt_update(clients[2], transposed, ["w", "b"], Quantization(),
                                    rng=np.random.default_rng(2), **kw)
    assert other_model.header["layout"] == a.header["layout"]
    with pytest.raises(EnvelopeError, match="different layouts or models"):
        add_updates(server, [a, other_model], [1, 1], run=RUN, server_round=ROUND, max_units=16)
    agg = add_updates(server, [other_model], [1], run=RUN, server_round=ROUND, max_units=16)
    with pytest.raises(EnvelopeError, match="spec differs"):
        decrypt_aggregate(clients[0], agg, deltas[0], keys, run=RUN, server_round=ROUND)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        encrypt_update(clients[2], deltas[2], keys, Quantization(), rng=np.random.default_rng(2),
                       **{**kw, "scale": 1.5})
    nan = {k: v.copy() for k, v in deltas[2].items()}
    nan["w"][3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        encrypt_update(clients[2], nan, keys, Quantization(), rng=np.random.default_rng(2), **kw)


def test_add_updates_refuses_the_same_sender_twice(server, update):
    a = _open(server, update)
    with pytest.raises(EnvelopeError, match="sender"):
        add_updates(server, [a, _copy(a)], [1, 1], run=RUN, server_round=ROUND, max_units=16)


def test_add_updates_refuses_sums_beyond_the_layout_headroom(clients, server, deltas):
    keys = float_keys(deltas[0])
    narrow = Quantization(max_clients=2)
    envs = [encrypt_update(clients[k], deltas[k], keys, narrow, scale=1.0, run=RUN, server_round=ROUND,
                           rng=np.random.default_rng(k), **COUNTS)[0] for k in range(N)]
    with pytest.raises(EnvelopeError, match="headroom"):
        add_updates(server, [_open(server, e) for e in envs], [1] * N, run=RUN, server_round=ROUND,
                    max_units=16)


# ----------------------------------------------------------------------------- noise budget
def test_noise_budget_survives_sixteen_updates_times_sixteen(clients, server):
    ctx = clients[0].context
    t = ctx.plain_modulus
    assert t.bit_length() == 40
    rng = np.random.default_rng(3)
    rows = [rng.integers(0, t // 256, (2, 4096), dtype=np.uint64) for _ in range(16)]
    fresh = [ctx.encrypt(r) for r in rows]
    assert all(ctx.noise_budget(b) > 8 for b in fresh[0])
    total = server.context.weighted_sum(fresh, [16] * 16)
    assert all(ctx.noise_budget(b) > 0 for b in total)
    expected = sum(r.astype(object) for r in rows) * 16
    assert int(expected.max()) < t
    np.testing.assert_array_equal(ctx.decrypt(total).astype(object), expected)
    # multipliers spelled with hex letters (10, 11, 15) scale exactly too
    small = [rng.integers(0, 2 ** 20, (1, 4096), dtype=np.uint64) for _ in range(3)]
    mixed = server.context.weighted_sum([ctx.encrypt(s) for s in small], [10, 11, 15])
    np.testing.assert_array_equal(ctx.decrypt(mixed), small[0] * 10 + small[1] * 11 + small[2] * 15)
    with pytest.raises(ValueError, match="one multiplier per input"):
        server.context.weighted_sum(fresh[:2], [1])
    with pytest.raises(ValueError, match="below the plaintext modulus"):
        ctx.encrypt(np.full((1, 4096), t, np.uint64))


# ----------------------------------------------------------------------------- strategy
BOUND = {100 + k: k for k in range(N)}  # node id -> the ceremony index it proved at join


def _strategy(server, bound=BOUND, **quant):
    from server.encrypted import EncryptedFedAvg

    strat = EncryptedFedAvg(server, Quantization(**quant))
    strat.run_id = RUN
    strat.bound, strat.members = dict(bound), set(bound)
    return strat


def _update(clients, deltas, k, scale=1.0, num_examples=10, train_steps=3, quant=None):
    env, _ = encrypt_update(clients[k], deltas[k], float_keys(deltas[k]), quant or Quantization(),
                            scale=scale, num_examples=num_examples, train_steps=train_steps,
                            run=RUN, server_round=ROUND, rng=np.random.default_rng(50 + k))
    return env


def _reply(node, env, **metrics):
    from fedface.protocol import ARRAYS, CLIENT_ID, METRICS, NUM_EXAMPLES

    return Reply(node, RecordDict({ARRAYS: to_record(env), METRICS: MetricRecord(
        {NUM_EXAMPLES: 10, CLIENT_ID: node - 100, **metrics})}))


def test_encrypted_fedavg_multipliers_come_from_the_authenticated_header(server, clients, deltas):
    strat = _strategy(server, max_multiplier=4)
    # clients pre-scaled by n_k / ref: the weighting is already in the ciphertexts
    ref = 40
    same = [_update(clients, deltas, k, scale=n / ref, num_examples=n)
            for k, n in enumerate((10, 25, 40))]
    assert strat.multipliers(same) == [1, 1, 1]
    # unscaled updates (scale 1) weighted by their sample counts: integers up to the bound
    unscaled = [_update(clients, deltas, k, num_examples=n) for k, n in enumerate((10, 20, 40))]
    assert strat.multipliers(unscaled) == [1, 2, 4]
    tiny = [_update(clients, deltas, k, num_examples=n) for k, n in enumerate((1, 100))]
    assert strat.multipliers(tiny) == [1, 4]  # never below 1


def test_forged_plaintext_metrics_do_not_change_the_aggregate(server, clients, deltas):
    """Adversary: anyone on the path rewrites the plaintext metrics of the replies (sample
    counts, he-scale, train-steps). The weights, multipliers, weight sum and PFM's step
    count come from the authenticated headers: the aggregate is the same, bit for bit."""
    from fedface.protocol import NUM_EXAMPLES

    counts, steps, ref = (30, 60, 90), (4, 8, 12), 90
    envs = [_update(clients, deltas, k, scale=n / ref, num_examples=n, train_steps=st)
            for k, (n, st) in enumerate(zip(counts, steps))]
    honest = [_reply(100 + k, e, **{NUM_EXAMPLES: n, "he-scale": n / ref, "train-steps": st})
              for k, (e, n, st) in enumerate(zip(envs, counts, steps))]
    forged = [_reply(100 + k, e, **{NUM_EXAMPLES: 10 ** 6 if k == 0 else 1, "he-scale": 0.001,
                                    "train-steps": 999})
              for k, e in enumerate(envs)]
    fk = float_keys(deltas[0])
    out = []
    for replies in (honest, forged):
        strat = _strategy(server, max_multiplier=16)  # room for multipliers, were any asked
        strat.round_lr, strat.pfm_beta = 0.1, 0.9
        screened = strat.screen(replies, ROUND)
        assert len(screened.good) == 3 and not screened.excluded
        record, _ = strat.aggregate_train(ROUND, screened.good)
        out.append(decrypt_aggregate(clients[0], record, deltas[0], fk, run=RUN, server_round=ROUND))
    (m_honest, e_honest), (m_forged, e_forged) = out
    for meta in (e_honest.meta, e_forged.meta):
        assert meta["multipliers"] == [1, 1, 1]
        assert meta["weight_sum"] == pytest.approx(sum(n / ref for n in counts))
        assert meta["steps"] == pytest.approx(sum(n * st for n, st in zip(counts, steps)) / sum(counts))
    for key in fk:
        np.testing.assert_array_equal(m_honest[key], m_forged[key])
        expected = sum(n * deltas[k][key].astype(np.float64) for k, n in enumerate(counts)) / sum(counts)
        assert np.abs(m_forged[key] - expected).max() < aggregate_error_bound(e_forged)
    # the header's counts themselves cannot be rewritten: the tag covers them
    env = _copy(envs[0])
    env.header["meta"]["num-examples"] = 10 ** 6
    _reject(server, env, "does not verify")
    # an update without them (an older client) is refused, naming the field
    bare = seal_envelope(UPDATE, envs[1].chunks, sign_key=clients[1].sign_key,
                         fingerprint=server.fingerprint, generation=1, params=envs[1].header["params"],
                         run=RUN, server_round=ROUND, sender=1, layout=envs[1].header["layout"],
                         spec=envs[1].header["spec"], meta={"scale": 1.0})
    _reject(server, bare, "lacks the authenticated meta field 'num-examples'")


def test_a_duplicated_envelope_is_left_out_and_the_round_goes_on(server, clients, deltas):
    """Adversary: the network (or a faulty node) delivers institution 1's envelope twice
    in one round. Screening keeps the first, excludes the copy with the reason, and the
    round aggregates the three institutions (it used to abort in add_updates)."""
    strat = _strategy(server)
    envs = [_update(clients, deltas, k) for k in range(3)]
    replies = [_reply(100 + k, envs[k]) for k in range(3)]
    again = _reply(101, envs[1])
    screened = strat.screen(replies[:2] + [again] + replies[2:], ROUND)
    assert screened.good == replies
    (excluded,) = screened.excluded
    assert excluded["node"] == 101
    assert "duplicate envelope of sender 1" in excluded["reason"] and "left out" in excluded["reason"]
    record, _ = strat.aggregate_train(ROUND, screened.good)
    fk = float_keys(deltas[0])
    mean, env = decrypt_aggregate(clients[3], record, deltas[0], fk, run=RUN, server_round=ROUND)
    assert env.meta["senders"] == [0, 1, 2]
    for key in fk:
        expected = sum(deltas[k][key].astype(np.float64) for k in range(3)) / 3
        assert np.abs(mean[key] - expected).max() < aggregate_error_bound(env)


def test_a_node_carrying_another_institutions_envelope_is_rejected(server, clients, deltas):
    """Adversary: nodes 101 and 102 swap envelopes (each relays the other's update as its
    own reply), and node 999, which proved no index at join, relays institution 0's.
    Every node may only send the envelope of the index it proved."""
    strat = _strategy(server)
    envs = [_update(clients, deltas, k) for k in range(3)]
    replies = [_reply(100, envs[0]), _reply(101, envs[2]), _reply(102, envs[1]), _reply(999, envs[0])]
    screened = strat.screen(replies, ROUND)
    assert screened.good == replies[:1]
    reasons = {e["node"]: e["reason"] for e in screened.excluded}
    assert set(reasons) == {101, 102, 999}
    assert "node 101 carries an envelope of sender 2, but proved index 1" in reasons[101]
    assert "node 102 carries an envelope of sender 1, but proved index 2" in reasons[102]
    assert "did not prove a ceremony index" in reasons[999]
    # and aggregate_train, handed unscreened replies, screens them itself
    with pytest.raises(EnvelopeError, match="may only send its own update"):
        _strategy(server).aggregate_train(ROUND, replies[:3])


class _Grid:
    """A Grid whose nodes answer with ``replies`` (the join's query)."""

    def __init__(self, replies):
        self.replies, self.sent = replies, []

    def get_node_ids(self):
        return [r.metadata.src_node_id for r in self.replies]

    def create_message(self, **kw):
        return kw

    def send_and_receive(self, msgs, timeout=None):
        self.sent += msgs
        return self.replies


def test_join_binds_each_node_to_the_index_it_proves(server, clients, ceremony):
    """Adversaries at join: a node replaying another node's proof, a node claiming an
    index it holds no key for, a forged sample count, a proof of another run, two nodes
    proving one index, and a client that sends no proof. Only nodes 100 and 101 join."""
    from flwr.app import ArrayRecord, ConfigRecord

    from crypto.update import JOIN_PROOF, prove_join
    from fedface.protocol import METRICS, NUM_EXAMPLES

    strat = _strategy(server, bound={})

    def reply(node, proof):
        content = RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 10 ** 6})})  # plaintext: ignored
        if proof is not None:
            content[JOIN_PROOF] = ConfigRecord(proof)
        return Reply(node, content)

    def proof(k, node, n=50, run=RUN):
        return prove_join(clients[k], run=run, node=node, num_examples=n)

    forged_index = {**proof(2, 103), "sender": 3}  # institution 2's key, claiming index 3
    forged_count = {**proof(0, 104, n=30), "num-examples": 3000}
    replies = [reply(100, proof(0, 100, n=30)), reply(101, proof(1, 101, n=50)),
               reply(102, proof(1, 101)),  # node 101's proof, replayed by node 102
               reply(103, forged_index), reply(104, forged_count),
               reply(105, proof(2, 105, run="run-other")),
               reply(106, proof(4, 106)), reply(107, proof(4, 107)),  # both hold institution 4's keys
               reply(108, None)]
    info = strat.join(_Grid(replies), ArrayRecord(), ConfigRecord({"data-dir": "d", "state-dir": "s"}),
                      timeout=1.0)["encryption"]
    assert strat.bound == {100: 0, 101: 1} and strat.members == {100, 101}
    assert info["joined"] == 2 and info["weight_ref"] == 50  # the proven counts, not 10**6
    assert info["senders"] == {"100": 0, "101": 1}
    reasons = {e["node"]: e["reason"] for e in info["join_excluded"]}
    assert set(reasons) == set(range(102, 109))
    for node in (102, 103, 104, 105):
        assert f"node {node} claims ceremony index" in reasons[node]
        assert "does not verify" in reasons[node]
    assert "nodes 106, 107 all prove ceremony index 4" in reasons[106] == reasons[107]
    assert "no proof" in reasons[108]
    assert strat.dirs == {"data-dir": "d", "state-dir": "s"}  # the release carries them


def test_wrong_typed_header_fields_are_named_before_the_tag_check(server, update, clients, deltas):
    """Adversary: a network attacker sends headers with wrong-typed fields; each is an
    EnvelopeError naming the field (a list as sender used to raise TypeError)."""
    for field, value in (("sender", [0]), ("sender", {"k": 1}), ("sender", None), ("sender", True),
                         ("round", "3"), ("round", 3.5), ("run", 5), ("fingerprint", None),
                         ("generation", "1"), ("kind", 1), ("spec", []), ("meta", []),
                         ("params", "bfv"), ("chunks", [[1, 2]]), ("chunks", "x"),
                         ("layout", {**update.header["layout"], "length": "12017"}),
                         ("layout", {"bits": 15}), ("version", "1")):
        env = _copy(update)
        env.header[field] = value
        with pytest.raises(EnvelopeError, match=f"field '{field}'"):
            _open(server, env)
        with pytest.raises(EnvelopeError, match=f"field '{field}'"):
            _open(server, to_record(env))  # the same through the wire format
    env = _copy(update)
    del env.header["sender"]
    with pytest.raises(EnvelopeError, match="lacks the field 'sender'"):
        _open(server, env)
    # an aggregate with a wrong-typed meta field (even signed by the server) is named too
    agg = add_updates(server, [_open(server, update), _open(server, _update(clients, deltas, 2))],
                      [1, 1], run=RUN, server_round=ROUND, max_units=16)
    bad = seal_envelope(AGGREGATE, agg.chunks, sign_key=server.sign_key,
                        fingerprint=server.fingerprint, generation=1, params=agg.header["params"],
                        run=RUN, server_round=ROUND, sender=SERVER, layout=agg.header["layout"],
                        spec=agg.header["spec"], meta={**agg.meta, "weight_sum": "1.5"})
    with pytest.raises(EnvelopeError, match="'weight_sum' must be a positive number"):
        decrypt_aggregate(clients[0], bad, deltas[0], float_keys(deltas[0]), run=RUN,
                          server_round=ROUND)


def test_aggregate_train_reuses_the_envelopes_screen_verified(server, clients, deltas, monkeypatch):
    import copy

    import server.encrypted as enc
    from crypto.envelope import to_record

    strat = _strategy(server)
    update = _update(clients, deltas, 1)
    strat.history[1] = to_record(update)
    clone = copy.deepcopy(strat)  # SEAL objects are shared, not copied
    assert clone.history[1] is strat.history[1] and clone.keys is strat.keys
    clone.history[2] = strat.history[1]
    assert 2 not in strat.history  # the dict itself is the copy's own
    replies = [_reply(101, update), _reply(102, _update(clients, deltas, 2))]
    assert strat.screen(replies, ROUND).good == replies
    calls = []
    monkeypatch.setattr(enc, "open_update", lambda *a, **k: calls.append(1))
    record, _ = strat.aggregate_train(ROUND, replies)
    assert record is not None and calls == []  # verified once, by screen()


def test_the_server_refuses_to_aggregate_a_single_update(server, clients, deltas):
    strat = _strategy(server)
    (reply,) = strat.screen([_reply(101, _update(clients, deltas, 1))], ROUND).good
    with pytest.raises(RuntimeError, match="an aggregate of one update is that update"):
        strat.aggregate_train(ROUND, [reply])


def test_corrupt_bundles_and_signing_keys_are_refused_naming_the_file(tmp_path):
    folder = tmp_path / "keys"
    init_keys(folder, 2)
    bundle = folder / "server" / "bundle.json"
    bundle.write_text(bundle.read_text()[:50])  # truncated
    with pytest.raises(KeyBundleError, match="not valid JSON"):
        load_server_keys(folder)
    sign_key = folder / "institutions" / "client_001" / "sign.key"
    sign_key.write_text("not-hex")
    with pytest.raises(KeyBundleError, match="client_001/sign.key is not a fedface signing key"):
        load_client_keys(folder, 1)
    sign_key.write_text("fedface-signing-key v1\nabcd\n")  # truncated
    with pytest.raises(KeyBundleError, match="client_001/sign.key does not hold 32 bytes"):
        load_client_keys(folder, 1)
    (folder / "key.json").write_text("{")
    with pytest.raises(KeyBundleError, match="key.json is not valid JSON"):
        describe_keys(folder)


# ----------------------------------------------------------------------------- FV under HE
def test_fv_candidates_under_encryption_let_one_institution_solve_every_update(server, clients):
    """Why FV is refused with he_keys. Adversary: institution 0, honest in the protocol,
    curious about the others. The old FV formed one homomorphic sum per candidate
    weighting (integer multipliers, he-fv-bits=4) of the same round's updates, and every
    institution decrypted every candidate to score it. With fv-candidates + 1 = 5
    institutions, institution 0 subtracts its own update and solves the linear system:
    every other institution's update comes out to within one quantization step."""
    from crypto.packing import Layout
    from server.fv import FederatedValidation

    rng = np.random.default_rng(21)
    length = 3000
    updates = [rng.uniform(-0.2, 0.2, length).astype(np.float32) for _ in range(N)]
    sizes = np.array([40, 90, 150, 260, 400])
    scales = sizes / sizes.max()  # each client pre-scales by n_k / n_max
    quant = Quantization(max_multiplier=16)
    opened = []
    for k in range(N):
        env, _ = encrypt_update(clients[k], {"v": updates[k]}, ["v"], quant, scale=float(scales[k]),
                                num_examples=int(sizes[k]), train_steps=1, run=RUN,
                                server_round=ROUND, rng=np.random.default_rng(100 + k))
        opened.append(_open(server, env))
    # The server's side, as the old FV ran it: one weighted sum per candidate weighting.
    fv = FederatedValidation(budget=4)
    rows, aggregates = [], []
    for _, tau in fv.candidates():
        ratio = fv.weights(None, tau, sizes) / scales
        mult = ([1] * N if np.allclose(ratio, ratio.max(), rtol=1e-6) else
                [int(x) for x in np.maximum(1, np.rint(16 * ratio / ratio.max()))])
        rows.append(mult)
        aggregates.append(add_updates(server, opened, mult, run=RUN, server_round=ROUND,
                                      max_units=quant.max_clients * quant.max_multiplier))
    assert len(aggregates) == 4 and len({tuple(r) for r in rows}) == 4
    # Institution 0's side: decrypt every candidate (as it did to score them) ...
    me = clients[0]
    layout = Layout.from_dict(aggregates[0].header["layout"])
    sums = np.stack([unpack(me.context.decrypt(a.chunks), layout) for a in aggregates]).astype(np.float64)
    # ... remove its own contribution (it knows its codes: it quantized them itself) ...
    own, _ = quantize(updates[0] * np.float32(scales[0]), layout, np.random.default_rng(100))
    a = np.array(rows, dtype=np.float64)
    rest = sums - np.outer(a[:, 0], own.astype(np.float64))
    # ... and solve 4 equations for the 4 other institutions' integer codes.
    assert np.linalg.matrix_rank(a[:, 1:]) == N - 1
    codes = np.linalg.solve(a[:, 1:], rest)
    assert np.abs(codes - np.rint(codes)).max() < 1e-6  # exact integers: nothing is hidden
    for i, k in enumerate(range(1, N)):
        recovered = np.rint(codes[i]) * layout.step - layout.clip  # the pre-scaled update
        truth = updates[k].astype(np.float64) * scales[k]
        assert np.abs(recovered - truth).max() < layout.step
        # and the update itself, dividing by its public scale
        assert np.abs(recovered / scales[k] - updates[k]).max() < layout.step / scales[k]


def test_fv_with_he_keys_is_refused_saying_why(ceremony):
    from fedface.config import RunConfig

    with pytest.raises(ValueError) as err:
        RunConfig(num_clients=4, he_keys=str(ceremony), fv=True)
    msg = str(err.value)
    assert "fv with he_keys is refused" in msg
    assert "another linear combination of the same encrypted updates" in msg
    assert "k+1 combinations reveal individual updates" in msg
    assert "plaintext FV" in msg and "HE without FV" in msg
    RunConfig(num_clients=4, fv=True)  # plaintext FV stays
    RunConfig(num_clients=4, he_keys=str(ceremony))  # and HE without FV
    for bad in (dict(num_clients=1, min_train_nodes=1), dict(num_clients=4, min_train_nodes=1)):
        with pytest.raises(ValueError, match="an aggregate of one update is that update"):
            RunConfig(he_keys=str(ceremony), **bad)


# ----------------------------------------------------------------------------- key custody
def test_an_institution_holds_only_its_own_signing_key_and_cannot_sign_for_another(
        ceremony, server, deltas):
    """Adversary: institution 3, with everything handed to it, forges an update in
    institution 1's name. Its folder holds no other private signing key, and what it can
    sign under sender 1 does not verify."""
    import dataclasses

    mine = ceremony / "institutions" / "client_003"
    assert sorted(p.name for p in mine.iterdir()) == ["bundle.json", "secret.key", "sign.key"]
    blob = b"".join(p.read_bytes() for p in mine.rglob("*") if p.is_file())
    for j in [*range(N), "server"]:
        where = ceremony / ("server" if j == "server" else f"institutions/client_{j:03d}")
        private = (where / "sign.key").read_text().split()[-1]
        held = private.encode() in blob or bytes.fromhex(private) in blob
        assert held == (j == 3), j
    k3 = load_client_keys(mine, 3)
    with pytest.raises(KeyBundleError, match="keys of institution 3"):
        load_client_keys(mine, 1)
    as_one = dataclasses.replace(k3, sender=1)  # its own keys, claiming index 1
    forged, _ = encrypt_update(as_one, deltas[3], float_keys(deltas[3]), Quantization(), scale=1.0,
                               run=RUN, server_round=ROUND, rng=np.random.default_rng(3), **COUNTS)
    assert forged.header["sender"] == 1
    msg = _reject(server, forged, "does not verify")
    assert "sender 1" in msg
    # its own update, under its own index, verifies
    own, _ = encrypt_update(k3, deltas[3], float_keys(deltas[3]), Quantization(), scale=1.0,
                            run=RUN, server_round=ROUND, rng=np.random.default_rng(3), **COUNTS)
    assert _open(server, own).header["sender"] == 3


@pytest.mark.parametrize("path,loader", [
    ("institutions/client_000/secret.key", "client"),
    ("institutions/client_000/sign.key", "client"),
    ("server/sign.key", "server"),
    ("institutions/client_000/bundle.json", "client"),
    ("server/bundle.json", "server"),
])
def test_key_files_owned_by_another_user_or_symlinked_are_refused(tmp_path, monkeypatch, path, loader):
    """Adversary: another local user who planted the key file (owned by them, so they can
    rewrite it), or a symbolic link to a file elsewhere."""
    d = tmp_path / "keys"
    init_keys(d, clients=1)
    load = (lambda: load_client_keys(d, 0)) if loader == "client" else (lambda: load_server_keys(d))
    f = d / path
    elsewhere = tmp_path / "elsewhere"
    shutil.copy(f, elsewhere)
    os.chmod(elsewhere, 0o600)
    f.unlink()
    f.symlink_to(elsewhere)
    with pytest.raises(KeyBundleError, match="symbolic link") as err:
        load()
    assert str(f) in str(err.value)
    f.unlink()
    shutil.copy(elsewhere, f)
    os.chmod(f, 0o600)
    load()
    if os.getuid() == 0:
        os.chown(f, 65534, 65534)  # really another user's file
    else:
        real = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real + 1)  # the file is not ours
    with pytest.raises(KeyBundleError, match="not by the current user") as err:
        load()
    assert str(f) in str(err.value)


# ----------------------------------------------------------------------------- what institutions open
def _institution(clients, k=0, node_id=5):
    from flwr.app import ConfigRecord, Context

    from client import he
    from fedface.protocol import HE_COMMIT_INDEX, HE_COMMIT_ROUND, HE_FINGERPRINT, HE_RUN, numpy_record

    ctx = Context(run_id=1, node_id=node_id, node_config={"partition-id": k}, state=RecordDict(),
                  run_config={})
    config = ConfigRecord({HE_RUN: RUN, HE_FINGERPRINT: clients[k].fingerprint,
                           HE_COMMIT_ROUND: 0, HE_COMMIT_INDEX: 0})
    like = {"w": np.zeros(SHAPES["w"], np.float32), "b": np.zeros(SHAPES["b"], np.float32)}
    he.join(ctx, clients[k], config, numpy_record(like))
    return ctx, config


def test_institutions_refuse_to_decrypt_an_aggregate_of_one_update(server, clients, deltas, update):
    """Adversary: the server, hoping an institution's decryption (or what it releases)
    shows it one institution's update, sends an 'aggregate' of that single update, or of
    the same update counted twice."""
    from client import he

    ctx, config = _institution(clients)
    one = add_updates(server, [_open(server, update)], [1], run=RUN, server_round=ROUND, max_units=16)
    with pytest.raises(EnvelopeError, match=r"update of 1 institution\(s\) \[1\]"):
        he.open_candidates(ctx, clients[0], config, [to_record(one)], ROUND)
    twice = seal_envelope(AGGREGATE, one.chunks, sign_key=server.sign_key,
                          fingerprint=server.fingerprint, generation=1, params=one.header["params"],
                          run=RUN, server_round=ROUND, sender=SERVER, layout=one.header["layout"],
                          spec=one.header["spec"], meta={**one.meta, "senders": [1, 1], "count": 2})
    with pytest.raises(EnvelopeError, match="refuses to decrypt"):
        he.open_candidates(ctx, clients[0], config, [to_record(twice)], ROUND)
    assert "he-pending-0" not in ctx.state.array_records  # nothing was decrypted
    two = add_updates(server, [_open(server, update), _open(server, _update(clients, deltas, 2))],
                      [1, 1], run=RUN, server_round=ROUND, max_units=16)
    (model,) = he.open_candidates(ctx, clients[0], config, [to_record(two)], ROUND)
    expected = (deltas[1]["w"].astype(np.float64) * 0.5 + deltas[2]["w"]) / 1.5
    assert np.abs(model["w"] - expected).max() < aggregate_error_bound(two)


def test_institutions_release_the_model_only_at_the_end_of_the_run(ceremony, clients, monkeypatch):
    """Adversary: the server asks for the plaintext model mid-run (a release query with
    round 2 committed, in a 3-round run). The ClientApp refuses, naming what was asked;
    at round 3 it releases. Under DP-SGD an earlier round is released only once the
    institution's own budget cannot pay for another round (a budget-stopped run)."""
    from flwr.app import ConfigRecord, Message, MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from client import he
    from client.app import build_client_app
    from fedface.config import RunConfig
    from fedface.protocol import ARRAYS, CONFIG, ERR_RELEASE_REFUSED, HE_RELEASE

    for name, value in (("_run_id", 1), ("_node_id", 5), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = RunConfig(num_clients=N, rounds=3, he_keys=str(ceremony))
    app = build_client_app(cfg.to_run_config())
    ctx, config = _institution(clients)

    def release(rnd):
        he._state(ctx)["round"] = rnd  # this institution holds the model of round rnd
        ask = ConfigRecord({**dict(config), HE_RELEASE: True, "he-commit-round": rnd})
        msg = Message(RecordDict({CONFIG: ask}), dst_node_id=5, message_type=MessageType.QUERY)
        return app(msg, ctx)

    for rnd in (1, 2, 4):  # refused with a typed error reply
        refused = release(rnd)
        assert refused.error.code == ERR_RELEASE_REFUSED
        assert f"model of round {rnd}, but this run has 3 rounds" in refused.error.reason
    reply = release(3)
    assert sorted(reply.content[ARRAYS]) == ["b", "w"]
    # the budget-stopped run's rule, with the ledger's answer given
    dp = cfg.replace(dp_epsilon=8.0)
    with pytest.raises(he.ReleaseRefused, match="still pays for another round"):
        he.check_release(dp, 2, lambda: True)
    he.check_release(dp, 2, lambda: False)  # budget spent: the run ended here
    with pytest.raises(he.ReleaseRefused):
        he.check_release(cfg, 2, lambda: False)  # no DP: no budget stop, no early release
    with pytest.raises(he.ReleaseRefused):
        he.check_release(dp, 0, lambda: False)  # the initial model is no run's result


def test_institutions_decrypt_one_aggregate_per_round(server, clients, deltas):
    """Adversary: a server that runs FV anyway (the config refuses it), sending several
    combinations of the same updates in one evaluate message, or a second, different
    combination for a round already opened. Institutions decrypt one aggregate a round."""
    from client import he

    ctx, config = _institution(clients)
    opened = [_open(server, _update(clients, deltas, k)) for k in (1, 2, 3)]

    def combo(mult):
        return to_record(add_updates(server, opened, mult, run=RUN, server_round=ROUND, max_units=64))

    first, second = combo([1, 1, 1]), combo([4, 2, 1])
    with pytest.raises(EnvelopeError, match="sent 2 aggregates for round 3"):
        he.open_candidates(ctx, clients[0], config, [first, second], ROUND)
    assert "he-pending-0" not in ctx.state.array_records
    (model,) = he.open_candidates(ctx, clients[0], config, [first], ROUND)
    with pytest.raises(EnvelopeError, match="a second, different aggregate for round 3"):
        he.open_candidates(ctx, clients[0], config, [second], ROUND)
    (again,) = he.open_candidates(ctx, clients[0], config, [first], ROUND)  # a resend is fine
    np.testing.assert_array_equal(again["w"], model["w"])


def test_a_fifo_in_place_of_a_key_file_is_refused_without_blocking(tmp_path):
    import os

    from crypto.keys import KeyBundleError, _read_private

    fifo = tmp_path / "sign.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyBundleError, match="not a regular file"):
        _read_private(fifo, "signing key")
