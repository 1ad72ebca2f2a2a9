"""Encrypted aggregation end to end: same training as plaintext, nothing plaintext on the
server, PFM / DP on top, dropouts, wrong keys and refused combinations."""

import json
import os
import re

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from typer.testing import CliRunner

from crypto.keys import init_keys, load_server_keys
from crypto.update import Quantization
from fedface.cli import app
from fedface.config import RunConfig
from fedface.protocol import ARRAYS, CLIENT_ID, METRICS, NUM_EXAMPLES, numpy_record
from fedface.runner import run
from server.checkpoint import load_checkpoint
from server.encrypted import EncryptedFedAvg
from tests.fakes import Reply

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("he") / "keys"
    init_keys(folder, 3)
    return str(folder)


def _final(doc):
    return next(v for v in doc["final"].values() if isinstance(v, dict) and "accuracy" in v)


class _RecordingGrid:
    """The server's Grid, recording every exchange: (messages sent, replies received)."""

    def __init__(self, grid, log):
        self._grid, self._log = grid, log

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *args, **kwargs):
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, *args, **kwargs))
        self._log.append((messages, replies))
        return replies


def _record_the_grid(monkeypatch) -> list:
    """Wrap the Grid the ServerApp hands to the round loop; returns the exchange log."""
    import server.app as server_app

    log: list = []
    real = server_app.run_federated
    monkeypatch.setattr(server_app, "run_federated",
                        lambda grid, cfg, **kw: real(_RecordingGrid(grid, log), cfg, **kw))
    return log


def _is_envelope(record) -> bool:
    names = set(record.keys())
    return ({"header", "tag"} <= names
            and all(n in ("header", "tag") or re.fullmatch(r"ct-\d{5}", n) for n in names)
            and all(a.numpy().dtype == np.uint8 and a.numpy().ndim == 1 for a in record.values()))


def test_encrypted_run_trains_like_the_plaintext_run_through_the_cli(small_cfg, tmp_path, monkeypatch):
    """`fedface keys init` then `fedface train --he-keys`: same losses, same bytes, and the
    server receives no plaintext update or model until the release (every exchange of
    the run is recorded at the server's Grid and inspected)."""
    from fedface.models import initial_backbone
    from fedface.protocol import CONFIG, HE_JOIN, HE_RELEASE

    res = runner.invoke(app, ["keys", "init", "--out", str(tmp_path / "k"), "--clients", "3"])
    assert res.exit_code == 0, res.output
    assert "fingerprint" in res.output
    for k in range(3):  # what to hand to whom
        assert f"institution {k} (he-sender={k})" in res.output
    assert "institutions/client_002" in res.output and "no secret key" in res.output
    fingerprint = json.loads((tmp_path / "k" / "key.json").read_text())["fingerprint"]
    docs, log = {}, []
    for mode in ("plain", "he"):
        args = ["train", "--clients", "3", "--rounds", "2", "--image-size", "48",
                "--batch-size", "32", "--out", str(tmp_path / mode),
                "--set", "synthetic-identities=60", "--set", "synthetic-images=6",
                "--set", "min-train-nodes=3"]
        if mode == "he":
            args += ["--he-keys", str(tmp_path / "k")]
            log = _record_the_grid(monkeypatch)
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        docs[mode] = json.loads((tmp_path / mode / "metrics.json").read_text())
    plain, he = docs["plain"], docs["he"]

    # What the server received, exchange by exchange.
    kinds: dict[str, int] = {}
    released = []
    for sent, replies in log:
        asks = [m.content[CONFIG] for m in sent if CONFIG in m.content.config_records]
        release = any(c.get(HE_RELEASE) for c in asks)
        for m in sent:  # down: train carries no model, evaluate only aggregate envelopes
            kind = m.metadata.message_type
            recs = m.content.array_records
            if kind == "train":
                assert all(len(rec) == 0 for rec in recs.values())
            elif kind == "evaluate":
                assert recs and all(_is_envelope(rec) for rec in recs.values())
            elif any(c.get(HE_JOIN) for c in asks):  # the join: the public initial model
                start = initial_backbone(RunConfig(**small_cfg))
                for k, v in start.state_dict().items():
                    np.testing.assert_array_equal(recs["arrays"][k].numpy(), v.numpy())
        for m in replies:
            assert not m.has_error(), m.error
            kind = m.metadata.message_type
            kinds[kind] = kinds.get(kind, 0) + 1
            recs = m.content.array_records
            if release:
                released.append(recs)
                continue
            if kind == "train":  # an update envelope, nothing else
                assert list(recs) == ["arrays"] and _is_envelope(recs["arrays"])
            else:  # evaluate scores, join proofs, catch-ups: no arrays at all
                assert not recs
            for rec in recs.values():  # no float array of any shape, the model's included
                assert all(a.numpy().dtype.kind != "f" for a in rec.values())
    # Queries: the join, the masks' setup, each round's unmasking, the release.
    assert kinds == {"query": 3 + 3 + 2 * 3 + 1, "train": 2 * 3, "evaluate": 2 * 3}
    (final_model,) = released  # the one plaintext the server receives: the final model
    model_keys = set(initial_backbone(RunConfig(**small_cfg)).state_dict())
    assert set(final_model["arrays"].keys()) == model_keys

    # Round 1 starts from the same public model in both runs (checked above: the join
    # sends the plaintext run's initial backbone) and trains alike; no identical random
    # stream is assumed (institutions draw private randomness from their own secrets).
    assert he["rounds"][0]["train_loss"] == pytest.approx(plain["rounds"][0]["train_loss"],
                                                         rel=0.02)
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
    # The checkpoint keeps no model (ciphertexts and metadata: test_encrypted_resume.py).
    ck = load_checkpoint(tmp_path / "he")
    assert ck["round"] == 2 and ck["arrays"] == {}


def test_encrypted_pfm_equals_plaintext_pfm_and_dp_composes(small_cfg, tmp_path, keys):
    """PFM's momentum, applied by the clients from the decrypted aggregate, trains like
    the server-side PFM; DP-SGD runs beneath encryption, and a run stopped by spent
    budgets still gets its final model released. (FV under encryption is refused:
    test_crypto.py shows the attack.)"""
    base = dict(small_cfg, rounds=3, strategy="pfm")
    plain = run(RunConfig(**{**base, "rounds": 2}, out=str(tmp_path / "plain")))
    he = run(RunConfig(**{**base, "rounds": 2}, out=str(tmp_path / "he"), he_keys=keys))
    for a, b in zip(plain["rounds"], he["rounds"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=3e-3)
    assert he["encryption"]["layout"]["digits"] == 2  # no FV: no multiplier headroom
    # Budgets for 2 of the 3 rounds: round 3 is declined by every institution, the run
    # ends with round 2's model, and the institutions (whose ledgers cannot pay for
    # another round) release it.
    dp = run(RunConfig(**{**base, "batch_size": 16}, out=str(tmp_path / "dp"), he_keys=keys,
                       dp_epsilon=8.0, dp_rounds=2))
    assert len(dp["rounds"]) == 2 and "privacy budgets spent" in dp["stopped"]
    for r in dp["rounds"]:
        assert r["dp"]["epsilon_max"] > 0 and r["encryption"]["multipliers"] == [1, 1, 1]
    assert dp["rounds"][-1]["dp"]["epsilon_max"] == pytest.approx(8.0, rel=0.02)
    assert dp["encryption"]["released_by_node"] and np.isfinite(_final(dp)["accuracy"])


def test_central_dp_client_fixed_under_encryption(small_cfg, tmp_path, keys):
    """Each institution adds its share of the central-DP noise before encrypting: the
    released model differs from the noiseless run's by the mechanism's noise, std
    ``z C / m`` per value (m shares of std ``z C / sqrt(m)``, averaged)."""
    import torch

    base = dict(small_cfg, rounds=1, central_dp="client-fixed", central_dp_clip=5.0, he_keys=keys)
    doc = run(RunConfig(**base, out=str(tmp_path / "cdp"), central_dp_noise=0.01))
    assert doc["encryption"]["weight_ref"] == 0  # uniform weights: every scale is 1
    assert all(r["encryption"]["weight_sum"] == 3.0 for r in doc["rounds"])
    assert doc["rounds"][-1]["central_dp"]["epsilon"] > 0
    run(RunConfig(**base, out=str(tmp_path / "quiet"), central_dp_noise=0.0))
    # Round 1 trains alike in both runs (same public start, no DP-SGD); the models differ
    # by the noise (and the 15-bit rounding, std ~1e-5, far below it).
    models = [torch.load(tmp_path / d / "model.pt", weights_only=True)["state_dict"]
              for d in ("cdp", "quiet")]
    diff = np.concatenate([(models[0][k] - models[1][k]).numpy().ravel()
                           for k in models[0] if models[0][k].is_floating_point()])
    expected = 0.01 * 5.0 / 3
    assert diff.size > 100_000
    assert diff.std() == pytest.approx(expected, rel=0.05)
    assert abs(diff.mean()) < 5 * expected / np.sqrt(diff.size)


def test_a_missing_institution_is_left_out_and_the_sum_is_over_the_others(small_cfg, tmp_path, keys):
    from fedface.data.prepare import prepare

    cfg = RunConfig(**{**small_cfg, "min_train_nodes": 2}, out=str(tmp_path / "drop"),
                    cache_dir=str(tmp_path / "cache"), he_keys=keys)
    prepare(cfg).client_files[1].unlink()  # institution 1 cannot join (no data)
    doc = run(cfg)
    (excl,) = doc["encryption"]["join_excluded"]
    assert "client_001.npz" in excl["reason"]
    for r in doc["rounds"]:
        assert r["clients_ok"] == 2 and r["encryption"]["clients"] == 2
        assert "client_001.npz" in r["excluded"][0]["reason"]
    assert np.isfinite(_final(doc)["accuracy"])


def test_an_institution_that_missed_an_exchange_says_it_is_out_of_sync(small_cfg, keys):
    from flwr.app import ConfigRecord, Context

    from client import he
    from fedface.protocol import HE_COMMIT_INDEX, HE_COMMIT_ROUND, HE_RUN

    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={})
    k = he.client_keys(RunConfig(**small_cfg, he_keys=keys), ctx)
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


def test_a_server_with_other_keys_is_refused(small_cfg, tmp_path, keys):
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    other = tmp_path / "other"
    init_keys(other, 3)
    cfg = RunConfig(**small_cfg, out=str(tmp_path / "wrong"), he_keys=str(other))
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


def test_refused_combinations_name_the_fix(small_cfg, keys):
    for bad, fix in ((dict(strategy="fedadam"), "fedavg, pfm or fedprox"),
                     (dict(central_dp="server-fixed"), "client-fixed"),
                     (dict(he_max_clients=2), "raise it"),
                     (dict(strategy="pfm", server_lr=2.0), "use server-lr=1"),
                     (dict(fv=True), "k\\+1 combinations reveal individual updates"),
                     (dict(min_train_nodes=1), "an aggregate of one update is that update")):
        with pytest.raises(ValueError, match=fix):
            RunConfig(**{**small_cfg, **bad}, he_keys=keys)


def test_the_strategy_refuses_plaintext_replies_and_weights_by_integers(keys):
    from crypto.keys import load_client_keys
    from crypto.update import encrypt_update

    strategy = EncryptedFedAvg(load_server_keys(keys), Quantization(max_multiplier=16))
    assert not strategy.keys.context.has_secret_key
    strategy.bound = {7: 0}
    plain = Reply(7, RecordDict({ARRAYS: numpy_record({"w": np.ones(3, np.float32)}),
                                  METRICS: MetricRecord({NUM_EXAMPLES: 5, CLIENT_ID: 0})}))
    s = strategy.screen([plain], server_round=1)
    assert not s.good and "not an encrypted envelope" in s.excluded[0]["reason"]

    def update(k, n, scale):
        return encrypt_update(load_client_keys(keys, k), {"w": np.zeros(8, np.float32)}, ["w"],
                              Quantization(max_multiplier=16), scale=scale, num_examples=n,
                              train_steps=1, run="r", server_round=1,
                              rng=np.random.default_rng(k))[0]
    # Clients pre-scaled by n / 100 (in their authenticated headers): sample-count
    # weighting needs no multiplication ...
    assert strategy.multipliers([update(0, 100, 1.0), update(1, 25, 0.25)]) == [1, 1]
    # ... a weighting the pre-scaling does not hold multiplies the small client up.
    strategy.weighted_by_key = "unit-weight"
    assert strategy.multipliers([update(0, 100, 1.0), update(1, 25, 0.25)]) == [4, 16]


def test_keys_cli_and_demo_encrypted(tmp_path):
    """`fedface demo --encrypted` runs the ceremony into OUT.keys, next to the shareable
    OUT, which holds no key; `keys show` prints the fingerprint and no secret; `keys
    rotate` makes generation 2 and retires generation 1."""
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--encrypted", "--rounds", "1", "--out", str(out),
                              "--set", "num-clients=3", "--set", "synthetic-identities=60",
                              "--set", "synthetic-images=6", "--set", "image-size=48",
                              "--set", "min-train-nodes=3", "--set", "batch-size=32"])
    assert res.exit_code == 0, res.output
    assert "key ceremony" in res.output and "encrypted aggregation: BFV" in res.output
    keys = tmp_path / "demo.keys"
    assert str(keys) in res.output.replace("\n", "")  # it says where the secret key is
    assert oct(os.stat(keys).st_mode & 0o777) == "0o700"
    desc = json.loads((keys / "key.json").read_text())
    sk = keys / "institutions" / "client_000" / "secret.key"
    secret = sk.read_bytes()
    # The run's output (metrics, model, client state) holds no key of any kind.
    signing = [(keys / "institutions" / f"client_{k:03d}" / "sign.key").read_text().split()[-1]
               for k in range(3)] + [(keys / "server" / "sign.key").read_text().split()[-1]]
    assert (out / "metrics.json").exists() and not (out / "keys").exists()
    for f in out.rglob("*"):
        assert f.name not in ("secret.key", "sign.key", "bundle.json", "key.json"), f
        if f.is_file():
            blob = f.read_bytes()
            assert secret[-64:] not in blob, f
            assert not any(p.encode() in blob or bytes.fromhex(p) in blob for p in signing), f
    res = runner.invoke(app, ["keys", "show", str(keys)])
    assert res.exit_code == 0 and desc["fingerprint"] in res.output
    assert secret.hex()[:32] not in res.output and not any(p in res.output for p in signing)
    res = runner.invoke(app, ["keys", "rotate", str(keys)])
    assert res.exit_code == 0, res.output
    assert json.loads((keys / "key.json").read_text())["generation"] == 2
    assert (keys / "institutions" / "client_000" / "sign.key").read_text().split()[-1] != signing[0]
    assert (keys / "retired" / "gen-1" / "institutions" / "client_000" / "secret.key").read_bytes() == secret
    res = runner.invoke(app, ["keys", "init", "--out", str(keys)])
    assert res.exit_code == 2 and "keys rotate" in res.output  # never overwrites keys
    res = runner.invoke(app, ["keys", "show", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "fedface keys init" in res.output


def test_an_institution_that_drops_out_of_a_round_catches_up_bit_for_bit(small_cfg, tmp_path, keys):
    """Institution 1 fails round 2's evaluate exchange (it never sees aggregate 2): before
    round 3 the server sends it the committed aggregates it missed, it applies them and
    trains round 3 from exactly the model the others hold."""
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    cfg = RunConfig(**{**small_cfg, "rounds": 3, "strategy": "pfm", "min_train_nodes": 2},
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
