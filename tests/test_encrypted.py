"""Encrypted aggregation end to end: same training as plaintext, nothing plaintext on the
server, PFM / FV / DP on top, dropouts, wrong keys and refused combinations."""

import json

import numpy as np
import pytest
from fakes import Reply
from flwr.app import MetricRecord, RecordDict
from typer.testing import CliRunner

from crypto.keys import init_keys, load_server_keys
from crypto.update import Quantization
from fedface.cli import app
from fedface.config import RunConfig
from fedface.protocol import ARRAYS, CLIENT_ID, METRICS, NUM_EXAMPLES, numpy_record
from fedface.runner import run
from server.encrypted import EncryptedFedAvg

pytestmark = pytest.mark.slow
runner = CliRunner()
SMALL = dict(synthetic_identities=60, synthetic_images=6, image_size=48, num_clients=3,
             rounds=2, batch_size=32, min_train_nodes=3)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("he") / "keys"
    init_keys(folder, 3)
    return str(folder)


def _final(doc):
    return next(v for v in doc["final"].values() if isinstance(v, dict) and "accuracy" in v)


def test_encrypted_run_trains_like_the_plaintext_run_through_the_cli(tmp_path):
    """`fedface keys init` then `fedface train --he-keys`: same losses, same bytes, no
    plaintext update or model on the server until the release."""
    res = runner.invoke(app, ["keys", "init", "--out", str(tmp_path / "k"), "--clients", "3"])
    assert res.exit_code == 0, res.output
    assert "fingerprint" in res.output
    fingerprint = json.loads((tmp_path / "k" / "key.json").read_text())["fingerprint"]
    docs = {}
    for mode in ("plain", "he"):
        args = ["train", "--clients", "3", "--rounds", "2", "--image-size", "48",
                "--batch-size", "32", "--out", str(tmp_path / mode),
                "--set", "synthetic-identities=60", "--set", "synthetic-images=6",
                "--set", "min-train-nodes=3"]
        if mode == "he":
            args += ["--he-keys", str(tmp_path / "k")]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        docs[mode] = json.loads((tmp_path / mode / "metrics.json").read_text())
    plain, he = docs["plain"], docs["he"]
    # Round 1 starts from the same public model with the same seeds: identical training.
    assert he["rounds"][0]["train_loss"] == pytest.approx(plain["rounds"][0]["train_loss"],
                                                         rel=1e-6)
    # Round 2 starts from the decrypted aggregate: equal up to 15-bit quantization.
    assert he["rounds"][1]["train_loss"] == pytest.approx(plain["rounds"][1]["train_loss"],
                                                         abs=2e-3)
    assert abs(_final(he)["accuracy"] - _final(plain)["accuracy"]) < 0.03
    enc = he["encryption"]
    assert enc["fingerprint"] == fingerprint and enc["joined"] == 3
    assert enc["layout"]["digits"] == 2 and enc["released_by_node"]
    for r_he, r_plain in zip(he["rounds"], plain["rounds"]):
        # Up: an encrypted update costs ~1.0x its float32 bytes. Down: one aggregate
        # (2 polynomials) instead of the model twice (train + evaluate).
        assert 1.0 < r_he["bytes_up"] / r_plain["bytes_up"] < 1.05
        assert 0.98 < r_he["bytes_down"] / r_plain["bytes_down"] < 1.05
        assert r_he["encryption"]["clients"] == 3
        assert "test_accuracy" not in r_he  # the server has no model to test mid-run
    assert not (tmp_path / "he" / "checkpoint.pt").exists()  # nothing plaintext kept
    res = runner.invoke(app, ["train", "--resume", str(tmp_path / "he")])
    assert res.exit_code == 2 and "encrypted run" in res.output


def test_encrypted_pfm_equals_plaintext_pfm_and_fv_dp_compose(tmp_path, keys):
    """PFM's momentum, applied by the clients from the decrypted aggregate, trains like
    the server-side PFM; FV scores homomorphic candidates; DP-SGD runs beneath."""
    base = dict(SMALL, rounds=3, strategy="pfm")
    plain = run(RunConfig(**base, out=str(tmp_path / "plain")))
    he = run(RunConfig(**base, out=str(tmp_path / "he"), he_keys=keys))
    for a, b in zip(plain["rounds"], he["rounds"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=3e-3)
    fv = run(RunConfig(**{**base, "batch_size": 16}, out=str(tmp_path / "fv"), he_keys=keys,
                       fv=True, dp_epsilon=8.0))
    for r in fv["rounds"]:
        scores = [c["score"] for c in r["fv"]["candidates"]]
        assert len(scores) >= 2 and all(s is not None for s in scores)
        assert r["dp"]["epsilon_max"] > 0
        assert max(r["encryption"]["multipliers"]) <= 16  # he-fv-bits=4
    assert fv["rounds"][-1]["dp"]["epsilon_max"] == pytest.approx(8.0, rel=0.02)
    assert fv["encryption"]["layout"]["digits"] == 1  # FV's multipliers take headroom


def test_central_dp_client_fixed_under_encryption(tmp_path, keys):
    cfg = RunConfig(**SMALL, out=str(tmp_path / "cdp"), he_keys=keys,
                    central_dp="client-fixed", central_dp_noise=0.01, central_dp_clip=5.0)
    doc = run(cfg)
    assert doc["encryption"]["weight_ref"] == 0  # uniform weights: every scale is 1
    assert all(r["encryption"]["weight_sum"] == 3.0 for r in doc["rounds"])
    assert doc["rounds"][-1]["central_dp"]["epsilon"] > 0


def test_a_missing_institution_is_left_out_and_the_sum_is_over_the_others(tmp_path, keys):
    from fedface.data.prepare import prepare

    cfg = RunConfig(**{**SMALL, "min_train_nodes": 2}, out=str(tmp_path / "drop"),
                    cache_dir=str(tmp_path / "cache"), he_keys=keys)
    prepare(cfg).client_files[1].unlink()  # institution 1 cannot join (no data)
    doc = run(cfg)
    (excl,) = doc["encryption"]["join_excluded"]
    assert "client_001.npz" in excl["reason"]
    for r in doc["rounds"]:
        assert r["clients_ok"] == 2 and r["encryption"]["clients"] == 2
        assert "client_001.npz" in r["excluded"][0]["reason"]
    assert np.isfinite(_final(doc)["accuracy"])


def test_an_institution_that_missed_an_exchange_says_it_is_out_of_sync(keys):
    from flwr.app import ConfigRecord, Context

    from client import he
    from fedface.protocol import HE_COMMIT_INDEX, HE_COMMIT_ROUND, HE_RUN

    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={})
    k = he.client_keys(RunConfig(**SMALL, he_keys=keys), ctx)
    cfg = ConfigRecord({HE_RUN: "r", "he-fingerprint": k.fingerprint, HE_COMMIT_ROUND: 0,
                        HE_COMMIT_INDEX: 0})
    with pytest.raises(he.OutOfSync, match="did not join"):
        he.sync(ctx, cfg, 0)
    he.join(ctx, k, cfg, numpy_record({"w": np.zeros(4, np.float32)}))
    he.sync(ctx, cfg, 0)  # round 0: the initial model
    cfg[HE_COMMIT_ROUND] = 2  # the others committed round 2; this node never saw round 1
    with pytest.raises(he.OutOfSync, match="holds the global model of round 0"):
        he.sync(ctx, cfg, 2)
    cfg["he-fingerprint"] = "0000:0000:0000:0000"
    with pytest.raises(ValueError, match="key mismatch"):
        he.check_key(k, cfg)


def test_a_server_with_other_keys_is_refused(tmp_path, keys):
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    other = tmp_path / "other"
    init_keys(other, 3)
    cfg = RunConfig(**SMALL, out=str(tmp_path / "wrong"), he_keys=str(other))
    result: dict = {}
    server = build_server_app(cfg.to_run_config(), result=result)
    client = build_client_app(cfg.replace(he_keys=keys).to_run_config())
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=3,
                       backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                                       "init_args": {"logging_level": "ERROR",
                                                     "log_to_driver": False}})
    except RuntimeError as raised:  # the engine may re-raise the ServerApp's error
        result.setdefault("error", raised)
    err = result.get("error")
    assert isinstance(err, RuntimeError), result
    assert "0 of 3 institutions joined" in str(err)
    assert f"the server holds key fingerprint {load_server_keys(other).fingerprint}" in str(err)
    assert str(err).count("key mismatch") == 3


def test_refused_combinations_name_the_fix(keys):
    for bad, fix in ((dict(strategy="fedadam"), "fedavg, pfm or fedprox"),
                     (dict(central_dp="server-fixed"), "client-fixed"),
                     (dict(he_max_clients=2), "raise it"),
                     (dict(pause_after=1), "pause-after"),
                     (dict(strategy="pfm", server_lr=2.0), "use server-lr=1")):
        with pytest.raises(ValueError, match=fix):
            RunConfig(**SMALL, he_keys=keys, **bad)


def test_the_strategy_refuses_plaintext_replies_and_weights_by_integers(keys):
    strategy = EncryptedFedAvg(load_server_keys(keys), Quantization(max_multiplier=16))
    assert not strategy.keys.context.has_secret_key
    plain = Reply(7, RecordDict({ARRAYS: numpy_record({"w": np.ones(3, np.float32)}),
                                  METRICS: MetricRecord({NUM_EXAMPLES: 5, CLIENT_ID: 0})}))
    s = strategy.screen([plain], server_round=1)
    assert not s.good and "not an encrypted envelope" in s.excluded[0]["reason"]

    def reply(n, scale):
        return Reply(1, metrics={NUM_EXAMPLES: n, "he-scale": scale})
    # Clients pre-scaled by n / 100: sample-count weighting needs no multiplication ...
    assert strategy.multipliers([reply(100, 1.0), reply(25, 0.25)]) == [1, 1]
    # ... uniform weighting (an FV candidate) multiplies the small client up.
    assert strategy.multipliers([reply(1, 1.0), reply(1, 0.25)]) == [4, 16]


def test_keys_cli_and_demo_encrypted(tmp_path):
    """`fedface demo --encrypted` runs the ceremony into OUT/keys; `keys show` prints the
    fingerprint and no secret; `keys rotate` makes generation 2 and retires generation 1."""
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--encrypted", "--rounds", "1", "--out", str(out),
                              "--set", "num-clients=3", "--set", "synthetic-identities=60",
                              "--set", "synthetic-images=6", "--set", "image-size=48",
                              "--set", "min-train-nodes=3", "--set", "batch-size=32"])
    assert res.exit_code == 0, res.output
    assert "key ceremony" in res.output and "encrypted aggregation: BFV" in res.output
    keys = out / "keys"
    desc = json.loads((keys / "key.json").read_text())
    res = runner.invoke(app, ["keys", "show", str(keys)])
    assert res.exit_code == 0 and desc["fingerprint"] in res.output
    secret = (keys / "client" / "secret.key").read_bytes()
    assert secret.hex()[:32] not in res.output
    res = runner.invoke(app, ["keys", "rotate", str(keys)])
    assert res.exit_code == 0, res.output
    assert json.loads((keys / "key.json").read_text())["generation"] == 2
    assert (keys / "retired" / "gen-1" / "client" / "secret.key").read_bytes() == secret
    res = runner.invoke(app, ["keys", "init", "--out", str(keys)])
    assert res.exit_code == 2 and "keys rotate" in res.output  # never overwrites keys
    res = runner.invoke(app, ["keys", "show", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "fedface keys init" in res.output


def test_an_institution_that_drops_out_of_a_round_catches_up_bit_for_bit(tmp_path, keys):
    """Institution 1 fails round 2's evaluate exchange (it never sees aggregate 2): before
    round 3 the server sends it the committed aggregates it missed, it applies them and
    trains round 3 from exactly the model the others hold."""
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    cfg = RunConfig(**{**SMALL, "rounds": 3, "strategy": "pfm", "min_train_nodes": 2},
                    out=str(tmp_path / "drop"), he_keys=keys)
    inner = build_client_app(cfg.to_run_config())
    flaky = ClientApp()

    @flaky.train()
    def train(msg, context):
        return inner(msg, context)

    @flaky.query()
    def query(msg, context):
        return inner(msg, context)

    @flaky.evaluate()
    def evaluate(msg, context):
        if context.node_config["partition-id"] == 1 and msg.content["config"]["server-round"] == 2:
            raise ConnectionError("institution 1 is offline")
        reply = inner(msg, context)
        # Every institution writes a hash of the model it now holds (test only).
        import hashlib

        model = context.state["he-pending-0"]  # this round's decrypted aggregate applied
        digest = hashlib.sha256(b"".join(model[k].numpy().tobytes() for k in sorted(model)))
        rnd, pid = msg.content["config"]["server-round"], context.node_config["partition-id"]
        (tmp_path / f"digest-r{rnd}-c{pid}").write_text(digest.hexdigest())
        return reply

    result: dict = {}
    run_simulation(server_app=build_server_app(cfg.to_run_config(), result=result),
                   client_app=flaky, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR",
                                                 "log_to_driver": False}})
    assert "error" not in result, result.get("error")
    r1, r2, r3 = result["rounds"]
    assert r2["clients_ok"] == 3  # it trained in round 2, then missed the evaluate exchange
    (event,) = r3["encryption"]["caught_up"]
    assert event["caught_up_to"] == 2
    assert r3["clients_ok"] == 3 and r3["num_excluded"] == 0  # back in round 3, in step
    digests = {(tmp_path / f"digest-r3-c{c}").read_text() for c in range(3)}
    assert len(digests) == 1  # the three hold the same model, bit for bit
    assert not (tmp_path / "digest-r2-c1").exists()
