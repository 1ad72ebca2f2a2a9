"""Masked encrypted runs in a Flower simulation: dropouts before sending and during the
unmasking, and the same final model, bit for bit, as the unmasked encrypted run over
the same survivors (the masks cancel exactly)."""

from __future__ import annotations

import shutil

import pytest
import torch

from fedface.config import RunConfig

pytestmark = pytest.mark.slow


def _simulate(cfg: RunConfig, flaky_train, flaky_query) -> dict:
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    inner = build_client_app(cfg.to_run_config())
    app = ClientApp()

    @app.train()
    def train(msg, context):
        if flaky_train(msg, context):
            raise ConnectionError("institution offline")
        return inner(msg, context)

    @app.evaluate()
    def evaluate(msg, context):
        return inner(msg, context)

    @app.query()
    def query(msg, context):
        if flaky_query(msg, context):
            raise ConnectionError("institution offline")
        return inner(msg, context)

    result: dict = {}
    run_simulation(server_app=build_server_app(cfg.to_run_config(), result=result),
                   client_app=app, num_supernodes=cfg.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR",
                                                 "log_to_driver": False}})
    assert "error" not in result, result.get("error")
    return result


def test_dropouts_before_sending_and_during_unmasking_give_the_unmasked_model(
        small_cfg, tmp_path):
    from crypto.keys import init_keys

    init_keys(tmp_path / "keys", 4)
    base = {**small_cfg, "num_clients": 4, "min_train_nodes": 3, "synthetic_identities": 48,
            "cache_dir": str(tmp_path / "cache"), "he_keys": str(tmp_path / "keys")}

    def drops_before_sending(msg, context):  # institution 3 is offline in round 1's training
        return (context.node_config["partition-id"] == 3
                and msg.content["config"]["server-round"] == 1)

    def drops_while_unmasking(msg, context):  # institution 2 leaves round 2's unmasking
        config = msg.content["config"]
        return (context.node_config["partition-id"] == 2 and bool(config.get("he-unmask"))
                and config.get("he-mask-epoch") == 3)

    masked = RunConfig(**base, out=str(tmp_path / "masked"))
    doc = _simulate(masked, drops_before_sending, drops_while_unmasking)
    r1, r2 = doc["rounds"]
    (e1,) = r1["encryption"]["masks"]["epochs"]
    assert e1["participants"] == [0, 1, 2, 3] and e1["dropped"] == [3]  # rebuilt from shares
    assert r1["clients_ok"] == 3 and r1["encryption"]["clients"] == 3
    (e2,) = r2["encryption"]["masks"]["epochs"]
    assert e2["participants"] == [0, 1, 2, 3]  # 3 caught up with a fresh key
    assert e2["survivors"] == [0, 1, 2, 3] and e2["unmask_answered"] == [0, 1, 3]
    assert r2["encryption"]["clients"] == 4  # 2's self mask rebuilt from its holders' shares
    assert doc["encryption"]["masks"]["graph"] == "complete"

    # The unmasked run with the same private randomness and the same survivors.
    plain = RunConfig(**base, out=str(tmp_path / "unmasked"), he_masks=False)
    (tmp_path / "unmasked" / "clients").mkdir(parents=True)
    for key in (tmp_path / "masked" / "clients").glob("*_randomness.key"):
        shutil.copy2(key, tmp_path / "unmasked" / "clients" / key.name)
    ref = _simulate(plain, drops_before_sending, lambda m, c: False)
    assert [r["encryption"]["clients"] for r in ref["rounds"]] == [3, 4]
    a = torch.load(tmp_path / "masked" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "unmasked" / "model.pt", weights_only=True)["state_dict"]
    tensors = [k for k in a if isinstance(a[k], torch.Tensor)]
    assert a.keys() == b.keys() and len(tensors) > 10
    assert all(torch.equal(a[k], b[k]) for k in tensors)
