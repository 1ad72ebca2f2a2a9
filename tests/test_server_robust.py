"""Server side: reply screening, PFM momentum, FV candidates, checkpoints, strategies."""

import copy

import numpy as np
import pytest
from fakes import Reply
from flwr.app import MetricRecord, RecordDict

from fedface.config import RunConfig
from fedface.momentum import momentum_update, seed_momentum
from fedface.protocol import ARRAYS, CLIENT_ID, METRICS, NUM_EXAMPLES, numpy_record
from server.checkpoint import check_resumable, load_checkpoint, save_checkpoint
from server.fv import FederatedValidation
from server.strategies import (
    PFM,
    STRATEGIES,
    build_strategy,
    load_strategy_state,
    strategy_state,
)
from server.validation import norm_outliers, screen_replies

REF = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


def _reply(node, arrays=None, n=10, metrics=None, cid=None):
    arrays = arrays if arrays is not None else {k: v + 0.01 * node for k, v in REF.items()}
    rec = {NUM_EXAMPLES: n, CLIENT_ID: cid if cid is not None else node, **(metrics or {})}
    return Reply(node, RecordDict({ARRAYS: numpy_record(arrays), METRICS: MetricRecord(rec)}))


def test_screen_replies_excludes_each_kind_of_bad_reply_with_a_reason():
    good = [_reply(i) for i in range(1, 6)]
    nan = {k: v.copy() for k, v in REF.items()}
    nan["w"][0, 0] = np.nan
    bad = [
        _reply(10, arrays={"w": REF["w"]}),                                   # missing key
        _reply(11, arrays={**REF, "extra": np.zeros(2, np.float32)}),         # unexpected key
        _reply(12, arrays={"w": np.zeros((3, 4), np.float32), "b": REF["b"]}),  # wrong shape
        _reply(13, arrays={"w": REF["w"].astype(np.float64), "b": REF["b"]}),  # wrong dtype
        _reply(14, arrays=nan),                                               # NaN
        _reply(15, arrays={k: v + np.float32(np.inf) for k, v in REF.items()}),  # Inf
        _reply(16, n=0),                                                      # no examples
        _reply(17, arrays={k: v + 50.0 for k, v in REF.items()}),              # norm outlier
    ]
    s = screen_replies(good + bad, REF)
    assert sorted(int(m.metadata.src_node_id) for m in s.good) == [1, 2, 3, 4, 5]
    reasons = {e["node"]: e["reason"] for e in s.excluded}
    assert set(reasons) == set(range(10, 18))
    assert "missing keys" in reasons[10] and "unexpected keys" in reasons[11]
    assert "shape" in reasons[12] and "dtype" in reasons[13]
    assert "NaN or Inf" in reasons[14] and "NaN or Inf" in reasons[15]
    assert "num-examples" in reasons[16] and "x the round's median" in reasons[17]


def test_norm_outliers_needs_a_distribution():
    assert norm_outliers({1: 1.0, 2: 100.0}) == {}  # too few to judge
    assert set(norm_outliers({1: 1.0, 2: 1.1, 3: 0.9, 4: 1.05, 5: 40.0})) == {5}
    assert norm_outliers({1: 1.0, 2: 3.0, 3: 0.5, 4: 8.0}) == {}  # honest spread


def _heavy_ball(v0, grads, lr, beta):
    """Centralized momentum SGD from buffer v0: final buffer and total displacement."""
    v, moved = v0.copy(), np.zeros_like(v0)
    for g in grads:
        v = beta * v + g
        moved += lr * v
    return v, moved


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("steps", [1, 3, 13])
def test_momentum_update_recovers_the_centralized_buffer(beta, steps):
    """With a constant gradient the estimate is exactly momentum SGD's buffer, whatever
    buffer the round started from."""
    rng = np.random.default_rng(steps)
    g = rng.normal(size=(4, 3)).astype(np.float32)
    for v0 in (None, rng.normal(size=(4, 3)).astype(np.float32)):
        start = np.zeros((4, 3), np.float32) if v0 is None else v0
        v_true, moved = _heavy_ball(start, [g] * steps, lr=0.05, beta=beta)
        before = {"w": np.ones((4, 3), np.float32), "steps": np.array([3])}
        after = {"w": before["w"] - moved, "steps": np.array([3])}
        m = momentum_update(None if v0 is None else {"w": v0}, before, after,
                            lr=0.05, steps=steps, beta=beta)
        assert "steps" not in m  # integer buffers carry no momentum
        np.testing.assert_allclose(m["w"], v_true, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="beta"):
        momentum_update(None, before, after, lr=0.1, steps=2, beta=1.0)


def test_momentum_update_without_momentum_is_the_mean_step():
    before = {"w": np.ones(3, np.float32)}
    after = {"w": np.full(3, 0.8, np.float32)}
    m = momentum_update({"w": np.full(3, 7.0, np.float32)}, before, after, lr=0.1,
                        steps=2, beta=0.0)
    np.testing.assert_allclose(m["w"], 1.0)  # (1 - 0.8) / (0.1 * 2); the old buffer is gone


def test_seed_momentum_makes_the_first_step_use_the_global_buffer():
    import torch

    from fedface.training import make_optimizer

    back, head = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(1, 2, bias=False)
    opt = make_optimizer(back, head, lr=0.1, momentum=0.9, weight_decay=0.0,
                         backbone_momentum=0.5)
    assert [g["momentum"] for g in opt.param_groups] == [0.5, 0.9]
    seed_momentum(opt, back, {"weight": np.full((1, 2), 2.0, np.float32)})
    w0 = back.weight.detach().clone()
    back.weight.grad, head.weight.grad = torch.ones(1, 2), torch.ones(2, 1)
    opt.step()  # backbone: v = 0.5 * 2 + 1 = 2; w -= 0.1 * 2
    assert torch.allclose(back.weight.detach(), w0 - 0.2)
    with pytest.raises(ValueError, match="lacks parameters"):
        seed_momentum(opt, back, {})
    with pytest.raises(ValueError, match="shape"):
        seed_momentum(opt, back, {"weight": np.zeros((2, 1), np.float32)})


def test_pfm_strategy_keeps_momentum_and_steps_like_fedavg():
    s = PFM(beta=0.9, min_train_nodes=2, min_available_nodes=2)
    s.current_arrays = {k: v.copy() for k, v in REF.items()}
    s.round_lr = 0.1
    replies = [_reply(1, metrics={"train-steps": 4}), _reply(3, metrics={"train-steps": 4})]
    agg, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(agg["w"].numpy(), 0.02, rtol=1e-5)  # mean of 0.01 and 0.03
    # Round 1 started from a zero buffer: 4 heavy-ball steps at beta 0.9 moved
    # lr * A * g, and the buffer holds (1 - 0.9^4) / 0.1 * g.
    a = sum((1 - 0.9 ** t) / 0.1 for t in range(1, 5))
    g = -0.02 / (0.1 * a)
    np.testing.assert_allclose(s.momentum["w"], (1 - 0.9 ** 4) / 0.1 * g, rtol=1e-4)
    # A server step size scales the step, not the momentum, which describes the clients'.
    s2 = PFM(beta=0.9, server_learning_rate=2.0, min_train_nodes=2, min_available_nodes=2)
    s2.current_arrays = {k: v.copy() for k, v in REF.items()}
    s2.round_lr = 0.1
    agg2, _ = s2.aggregate_train(1, replies)
    np.testing.assert_allclose(agg2["w"].numpy(), 0.04, rtol=1e-5)
    np.testing.assert_allclose(s2.momentum["w"], s.momentum["w"])
    # Steps are weighted like the aggregate: uniform weights (central DP) weight uniformly.
    s3 = PFM(beta=0.0, min_train_nodes=2, min_available_nodes=2, weighted_by_key="unit-weight")
    s3.current_arrays = {k: v.copy() for k, v in REF.items()}
    s3.round_lr = 0.1
    s3.aggregate_train(1, [_reply(1, n=10, metrics={"train-steps": 1, "unit-weight": 1}),
                           _reply(3, n=30, metrics={"train-steps": 3, "unit-weight": 1})])
    np.testing.assert_allclose(s3.momentum["w"], -0.02 / (0.1 * 2), rtol=1e-5)  # mean 2 steps


def test_head_momentum_is_kept_per_round_and_reloaded(tmp_path):
    """PFM: a head's momentum buffers are saved after each round next to the head and the
    newest one before the current round is loaded (so a resumed round replays alike)."""
    import torch
    from flwr.app import Context, RecordDict

    from client.task import head_momentum, save_head
    from fedface.protocol import TrainInstructions

    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 2}, state=RecordDict(),
                  run_config={})
    head = torch.nn.Linear(3, 2)
    ins = lambda r: TrainInstructions(server_round=r, state_dir=str(tmp_path))  # noqa: E731
    assert head_momentum(ctx, ins(1)) is None  # first round: nothing kept yet
    for r in (1, 2, 3):
        save_head(head, ctx, ins(r), {"weight": np.full((2, 3), float(r), np.float32)})
    assert sorted(p.name for p in tmp_path.glob("client_002_headm_r*")) == [
        "client_002_headm_r00002.pt", "client_002_headm_r00003.pt"]  # the last two
    np.testing.assert_array_equal(head_momentum(ctx, ins(3))["weight"], 2.0)
    np.testing.assert_array_equal(head_momentum(ctx, ins(4))["weight"], 3.0)
    # A truncated file is refused naming it, and left in place.
    bad = tmp_path / "client_002_headm_r00003.pt"
    bad.write_bytes(b"\x80trunc")
    with pytest.raises(ValueError, match="client_002_headm_r00003.pt is unreadable"):
        head_momentum(ctx, ins(4))
    assert bad.exists()
    # Without a state folder the node's state keeps it.
    bare = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    save_head(head, bare, TrainInstructions(server_round=1), {"weight": np.ones((2, 3), np.float32)})
    np.testing.assert_array_equal(head_momentum(bare, TrainInstructions(server_round=2))["weight"], 1.0)


def test_fv_candidates_weights_and_choice():
    fv = FederatedValidation(budget=4)
    names = [n for n, _ in fv.candidates()]
    assert names[:2] == ["samples", "uniform"] and len(names) == 4
    replies = [_reply(1, n=10), _reply(2, n=30)]
    np.testing.assert_allclose(fv.weights(replies, 1.0), [0.25, 0.75])
    np.testing.assert_allclose(fv.weights(replies, 0.0), [0.5, 0.5])
    cands = fv.aggregate_candidates(build_strategy(RunConfig(num_clients=2)), 1, replies)
    # samples: 0.25*0.01 + 0.75*0.02; uniform: 0.015 - and the replies are left unchanged
    np.testing.assert_allclose(cands[0]["arrays"]["b"].numpy(), 0.0175, rtol=1e-5)
    np.testing.assert_allclose(cands[1]["arrays"]["b"].numpy(), 0.015, rtol=1e-5)
    # Every candidate weighs the original counts (not the previous candidate's weights).
    for c in cands[2:]:
        np.testing.assert_allclose(c["weights"], fv.weights(replies, c["tau"]))
        w = np.array([10.0, 30.0]) ** c["tau"]
        np.testing.assert_allclose(c["arrays"]["b"].numpy(), (w @ [0.01, 0.02]) / w.sum(), rtol=1e-5)
    assert len({round(float(c["arrays"]["b"].numpy()[0]), 7) for c in cands}) == 4
    assert [m.content[METRICS][NUM_EXAMPLES] for m in replies] == [10, 30]
    assert fv.choose([0.7, 0.8, None, 0.75]) == 1
    assert fv.choose([None, None]) == 0


def test_checkpoint_round_trip_and_resume_guard(tmp_path):
    s = build_strategy(RunConfig(strategy="pfm", num_clients=2))
    s.momentum = {"w": np.arange(3, dtype=np.float32)}
    s.round_lr = 0.05
    save_checkpoint(tmp_path, 3, REF, {"strategy": strategy_state(s), "fv": {}},
                    RunConfig().to_dict(), {"rounds": [{"round": 1}]})
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    ck = load_checkpoint(tmp_path)
    assert ck["round"] == 3 and ck["metrics"]["rounds"] == [{"round": 1}]
    s2 = build_strategy(RunConfig(strategy="pfm", num_clients=2))
    load_strategy_state(s2, ck["strategy"]["strategy"])
    np.testing.assert_array_equal(s2.momentum["w"], s.momentum["w"])
    assert s2.round_lr == 0.05
    check_resumable(RunConfig().to_dict(), RunConfig(rounds=50, out="x").to_dict())
    with pytest.raises(ValueError, match="lr: 0.1 -> 0.2"):
        check_resumable(RunConfig().to_dict(), RunConfig(lr=0.2).to_dict())
    with pytest.raises(FileNotFoundError, match="--resume needs"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "checkpoint.pt").write_bytes(b"torn")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_builds_and_aggregates(name):
    """Each strategy's first aggregate is its own rule applied to the sample-weighted mean
    update (weights 10 and 30: 0.25 x 0.01 + 0.75 x 0.02 = 0.0175 per value)."""
    cfg = RunConfig(strategy=name, num_clients=2)
    s = build_strategy(cfg)
    current = {k: v.copy() for k, v in REF.items()}
    # what configure_train records in stateful strategies
    s.current_arrays = current if name in ("fedadam", "pfm") else numpy_record(current)
    s.round_lr = 0.1
    agg, _ = copy.deepcopy(s).aggregate_train(1, [_reply(1, n=10, metrics={"train-steps": 2}),
                                                  _reply(2, n=30, metrics={"train-steps": 2})])
    assert set(agg.keys()) == set(REF)
    mean = 0.25 * 0.01 + 0.75 * 0.02
    if name == "fedadam":  # m = (1-b1) d, v = (1-b2) d^2, Flower's bias-corrected step size
        b1, b2 = 0.9, 0.99
        eta = cfg.fedadam_eta * np.sqrt(1 - b2 ** 2) / (1 - b1 ** 2)
        want = eta * (1 - b1) * mean / (np.sqrt((1 - b2) * mean ** 2) + cfg.fedadam_tau)
    elif name == "fedavgm":  # first step: momentum = the update, scaled by server lr 1
        want = cfg.server_lr * mean
    else:  # fedavg, fedprox (client-side term), pfm (server lr 1)
        want = mean
    for k, a in agg.items():
        np.testing.assert_allclose(a.numpy(), np.full(REF[k].shape, want), rtol=1e-4)


def test_config_knows_every_registered_strategy():
    from fedface.config import STRATEGY_NAMES

    assert set(STRATEGY_NAMES) == set(STRATEGIES)


def test_unknown_strategy_refused():
    with pytest.raises(ValueError, match="strategy='fedsgd'"):
        RunConfig(strategy="fedsgd")
