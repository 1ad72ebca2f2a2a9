"""Server side: reply screening, typed error replies, PFM momentum, FV candidates,
checkpoints and strategy state, and a real client's reply through the server's code."""

import copy
import math

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedface.config import RunConfig
from fedface.momentum import momentum_update, seed_momentum
from fedface.protocol import (
    ARRAYS,
    AUC,
    CLIENT_ID,
    CONFIG,
    DP_BUDGET_SPENT,
    DP_EPSILON_SPENT,
    ERR_CLIENT,
    ERR_DP_BUDGET_SPENT,
    ERR_OUT_OF_SYNC,
    FV_PREFIX,
    METRICS,
    NODE_DATA_PATH,
    NODE_STATE_DIR,
    NUM_EXAMPLES,
    OUT_OF_SYNC,
    TRAIN_LOSS,
    TRAIN_STEPS,
    UNIT_WEIGHT,
    TrainInstructions,
    numpy_record,
    record_numpy,
    score_key,
    weighted_metric,
)
from server.checkpoint import check_resumable, load_checkpoint, save_checkpoint
from server.fv import FederatedValidation, SingleCandidate
from server.screening import (
    budgets_spent,
    client_error,
    missed,
    norm_outliers,
    screen_replies,
)
from server.strategies import PFM, STRATEGIES, build_strategy
from tests.fakes import Reply

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


def _asked(node: int, kind=MessageType.TRAIN) -> Message:
    return Message(RecordDict({CONFIG: TrainInstructions().to_record()}), dst_node_id=node,
                   message_type=kind)


def _raised(msg: Message, err: Exception) -> Message:
    """The error reply the simulation engine makes of a client's exception (Flower's
    code, the client's text wrapped in Ray's and Flower's)."""
    from flwr.clientapp.client_app import ClientAppException

    wrapped = ClientAppException(str(err))
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                         reason=str(type(wrapped)) + ":<'" + str(wrapped) + "'>"), reply_to=msg)


def test_error_replies_are_read_by_their_typed_code(flower_task):
    """Clients reply typed errors (fedface.protocol.ERR_*); the server acts on the code
    and keeps the reason. A raised exception (Flower's own code, the text wrapped) keeps
    Flower's code: the server never recovers meaning from a reason's text."""
    typed = [Message(Error(code=ERR_DP_BUDGET_SPENT, reason=f"{DP_BUDGET_SPENT}: 8.0 of 8.0"),
                     reply_to=_asked(1)),
             Message(Error(code=ERR_OUT_OF_SYNC, reason=f"{OUT_OF_SYNC}: holds round 1"),
                     reply_to=_asked(2)),
             Message(Error(code=ERR_CLIENT, reason="data file missing"), reply_to=_asked(3))]
    raised = [_raised(_asked(1), ValueError(f"{DP_BUDGET_SPENT}: 8.0 of 8.0")),
              _raised(_asked(2), ValueError(f"{OUT_OF_SYNC}: holds round 1")),
              _raised(_asked(3), FileNotFoundError("data file missing"))]
    crashed = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    records = [client_error(m) for m in raised]
    assert [(e["node"], e["code"]) for e in records] == [(1, crashed), (2, crashed), (3, crashed)]
    assert records[0]["reason"] == f"client error: {DP_BUDGET_SPENT}: 8.0 of 8.0"
    assert not budgets_spent(records[:1])  # its text says "budget", its code does not
    for replies, other in ((typed, ERR_CLIENT),):
        records = [client_error(m) for m in replies]
        assert [(e["node"], e["code"]) for e in records] == [
            (1, ERR_DP_BUDGET_SPENT), (2, ERR_OUT_OF_SYNC), (3, other)]
        assert records[0]["reason"] == f"client error: {DP_BUDGET_SPENT}: 8.0 of 8.0"
        assert records[2]["reason"] == "client error: data file missing"
        # The screening excludes them with those records, in reply order.
        s = screen_replies(replies[:1] + [_reply(4)] + replies[1:], REF)
        assert [e["node"] for e in s.excluded] == [1, 2, 3] and len(s.good) == 1
        assert s.excluded == records
        # Acting on the code: a budget stop only when every excluded reply declined ...
        assert budgets_spent(records[:1]) and not budgets_spent(records)
        # ... catch-up for the out-of-sync node and the ones that missed the exchange.
        sent = [_asked(n, MessageType.EVALUATE) for n in (1, 2, 3, 4)]
        answers = [Message(RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 1})}), reply_to=sent[0]),
                   replies[2]]
        assert missed(sent, answers, records) == {2, 3, 4}


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
    save_checkpoint(tmp_path, 3, REF, {"strategy": s.state_dict(), "fv": {}},
                    RunConfig().to_dict(), {"rounds": [{"round": 1}]})
    assert not list(tmp_path.glob("*.tmp"))
    ck = load_checkpoint(tmp_path)
    assert ck["round"] == 3 and ck["metrics"]["rounds"] == [{"round": 1}]
    s2 = build_strategy(RunConfig(strategy="pfm", num_clients=2))
    s2.load_state_dict(ck["strategy"]["strategy"])
    np.testing.assert_array_equal(s2.momentum["w"], s.momentum["w"])
    assert s2.round_lr == 0.05
    with pytest.raises(ValueError, match="FedAvgM does not keep"):  # another strategy's state
        build_strategy(RunConfig(strategy="fedavgm", num_clients=2)).load_state_dict(s.state_dict())
    check_resumable(RunConfig().to_dict(), RunConfig(rounds=50, out="x").to_dict())
    with pytest.raises(ValueError, match="lr: 0.1 -> 0.2"):
        check_resumable(RunConfig().to_dict(), RunConfig(lr=0.2).to_dict())
    with pytest.raises(FileNotFoundError, match="--resume needs"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "checkpoint.pt").write_bytes(b"torn")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_of_the_former_format_still_loads(tmp_path):
    """Format 1 wrapped every attribute of the strategy's vars() walk as {kind, value};
    it loads into the strategy's state_dict (FedAvgM inside server-side DP)."""
    t = torch.from_numpy
    blob = {"format": "fedface-checkpoint/1", "round": 2, "arrays": {k: t(v) for k, v in REF.items()},
            "strategy": {"fv": {}, "strategy": {
                "strategy": {"kind": "strategy", "value": {
                    "current_arrays": {"kind": "arrayrecord", "value": {"w": t(np.ones(2, np.float32))}},
                    "momentum_vector": {"kind": "list", "value": [t(np.full(2, 3.0))]}}},
                "current_arrays": {"kind": "arrayrecord", "value": {}},
                "clipping_norm": {"kind": "float", "value": 0.25}}},
            "rng": {}, "config": {}, "metrics": {"rounds": []}}
    torch.save(blob, tmp_path / "checkpoint.pt")
    ck = load_checkpoint(tmp_path)
    wrapper = build_strategy(RunConfig(strategy="fedprox", num_clients=3, central_dp="server-fixed"))
    wrapper.strategy = STRATEGIES["fedavgm"](RunConfig(num_clients=3))
    wrapper.load_state_dict(ck["strategy"]["strategy"])
    assert wrapper.clipping_norm == 0.25
    np.testing.assert_array_equal(wrapper.strategy.current_arrays["w"].numpy(), 1.0)
    assert wrapper.strategy.momentum_norm() == pytest.approx(3.0 * math.sqrt(2))


def _round(strategy, rnd: int, arrays, grid) -> object:
    """One round as the loop runs it: instructions, configure, aggregate, global model.
    Replies move the model by a per-node step, one of them beyond the central-DP clip."""
    ins = strategy.instruct(TrainInstructions(server_round=rnd, lr=0.1))
    list(strategy.configure_train(rnd, arrays, ins.to_record(), grid))
    current = record_numpy(arrays)
    replies = [_reply(node, arrays={k: v + np.float32(step * rnd) for k, v in current.items()},
                      n=10 * node, metrics={TRAIN_STEPS: 2, UNIT_WEIGHT: 1})
               for node, step in ((1, 0.01), (2, -0.02), (3, 0.5))]
    np.random.seed(rnd)  # Flower's server-side DP noise draws from NumPy's global generator
    agg, _ = strategy.aggregate_train(rnd, replies)
    return strategy.global_arrays(agg, arrays)


class _Grid:
    def get_node_ids(self):
        return [1, 2, 3]


SERVER_SIDE_DP = [(n, m) for n in ("fedavg", "fedprox") for m in ("server-fixed", "server-adaptive")]


@pytest.mark.parametrize("name,central", [(n, "off") for n in sorted(STRATEGIES)] + SERVER_SIDE_DP)
def test_strategy_state_survives_a_checkpoint_between_two_aggregations(
        tmp_path, flower_task, name, central):
    """A strategy checkpointed after round 1 and restored into a fresh one aggregates
    round 2 to the same arrays and state (PFM's momentum, sent to the clients), bit for
    bit, as the strategy that never stopped."""
    cfg = RunConfig(strategy=name, central_dp=central, central_dp_noise=0.5, num_clients=3,
                    min_train_nodes=3)
    start = numpy_record({k: v + 0.1 for k, v in REF.items()})
    kept = build_strategy(cfg)
    first = _round(kept, 1, start, _Grid())
    save_checkpoint(tmp_path, 1, record_numpy(first), {"strategy": kept.state_dict(), "fv": {}},
                    cfg.to_dict(), {"rounds": []})
    ck = load_checkpoint(tmp_path)
    restored = build_strategy(cfg)
    restored.load_state_dict(ck["strategy"]["strategy"])
    assert restored.state_dict().keys() == kept.state_dict().keys()
    resumed = _outcome(restored, _round(restored, 2, numpy_record(ck["arrays"]), _Grid()))
    uninterrupted = _outcome(kept, _round(kept, 2, first, _Grid()))
    assert _same(resumed, uninterrupted)
    if name in ("fedavgm", "fedadam", "pfm") or central == "server-adaptive":
        # The state matters: a fresh strategy (nothing restored) ends elsewhere.
        fresh = build_strategy(cfg)
        assert not _same(_outcome(fresh, _round(fresh, 2, first, _Grid())), uninterrupted)


def _outcome(strategy, arrays) -> dict:
    return {"arrays": record_numpy(arrays), "state": strategy.state_dict()}


def _same(a, b) -> bool:
    """Equal, bit for bit, down nested dicts and lists of arrays."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, (np.ndarray, np.generic)):
        return np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b)
    return a == b


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


# ------------------------------------------------------- a real client's reply, end to end
SIZE = 32


@pytest.fixture
def institution(tmp_path):
    """One institution's data file (4 people, 40 training and 12 validation images)."""
    from fedface.data.prepare import ClientData

    rng = np.random.default_rng(0)
    y = np.arange(40) % 4
    base = rng.integers(0, 255, (4, SIZE, SIZE, 3))
    x = np.clip(base[y] + rng.normal(0, 20, (40, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    path = tmp_path / "site.npz"
    ClientData(x, y, x[:12], np.arange(12) % 4).save(path)
    return path


def _config(**changes) -> RunConfig:
    return RunConfig(**{**dict(image_size=SIZE, embedding_size=32, batch_size=10, rounds=1,
                               local_epochs=1, num_clients=3, min_train_nodes=1), **changes})


def _ask_client(cfg, context, kind, content: dict, rnd: int = 1) -> Message:
    """What the server sends (the strategy's instructions), answered by the real ClientApp;
    a raised exception becomes the error reply the simulation engine would make."""
    from client.app import build_client_app

    ins = build_strategy(cfg).instruct(TrainInstructions(server_round=rnd, lr=0.1, local_epochs=1))
    msg = Message(RecordDict({**content, CONFIG: ins.to_record()}), dst_node_id=7,
                  message_type=kind)
    try:
        return build_client_app()(msg, context)
    except Exception as err:  # noqa: BLE001 (the runtime replies whatever the client raised)
        return _raised(msg, err)


def _site(cfg, data, state) -> Context:
    return Context(run_id=1, node_id=7, state=RecordDict(), run_config=cfg.to_run_config(),
                   node_config={NODE_DATA_PATH: str(data), NODE_STATE_DIR: str(state)})


def test_a_real_client_reply_goes_through_the_servers_screening_and_metrics(
        tmp_path, institution, flower_task):
    """The keys the ClientApp writes are the keys the server reads: its train reply passes
    the screening (arrays, dtypes, num-examples, train-steps for the norm per step) and
    feeds the round's train loss; its evaluate reply gives the round's and FV's scores."""
    from fedface.models import initial_backbone

    cfg = _config(strategy="pfm")
    strategy = build_strategy(cfg)
    start = numpy_record({k: v.numpy() for k, v in initial_backbone(cfg).state_dict().items()})
    context = _site(cfg, institution, tmp_path / "site")
    reply = _ask_client(cfg, context, MessageType.TRAIN, {ARRAYS: start})
    screening = strategy.screen([reply], 1, start)
    assert screening.good == [reply] and not screening.excluded, screening.excluded
    assert screening.update_norms[7] > 0
    loss = weighted_metric(screening.good, TRAIN_LOSS)
    assert loss is not None and math.isfinite(loss)
    assert weighted_metric(screening.good, TRAIN_STEPS) >= 1  # PFM's step count
    # The evaluate exchange: the round's model and an FV candidate, one score each.
    model = strategy.global_arrays(reply.content[ARRAYS], start)
    scored = _ask_client(cfg, context, MessageType.EVALUATE,
                         {ARRAYS: model, f"{FV_PREFIX}1": start})
    assert not scored.has_error(), scored.error
    fv_scores = FederatedValidation().scores([scored], 2)
    assert all(s is not None and 0.0 <= s <= 1.0 for s in fv_scores)
    assert SingleCandidate().scores([scored], 1) == fv_scores[:1]
    assert weighted_metric([scored], score_key(1, AUC)) is not None


def test_a_private_clients_reply_and_decline_reach_the_privacy_record(
        tmp_path, institution, flower_task):
    """DP-SGD: the epsilon the client reports is the one the round records; once its
    budget is spent it declines, and the server reads the decline from the reply (its
    code) as a spent budget: the round's record counts it, and the run stops."""
    from fedface.models import initial_backbone
    from fedface.privacy import privacy_record

    cfg = _config(dp_epsilon=8.0)
    strategy = build_strategy(cfg)
    start = numpy_record({k: v.numpy() for k, v in initial_backbone(cfg).state_dict().items()})
    context = _site(cfg, institution, tmp_path / "site")
    reply = _ask_client(cfg, context, MessageType.TRAIN, {ARRAYS: start})
    screening = strategy.screen([reply], 1, start)
    assert screening.good == [reply], screening.excluded
    rec = privacy_record(cfg, strategy, screening.good, screening.excluded, 1, [])
    spent = float(reply.content[METRICS][DP_EPSILON_SPENT])
    assert rec["dp"]["epsilon_spent"] == {"7": round(spent, 4)} and rec["dp"]["declined"] == 0
    assert 0 < spent <= 8.0 + 1e-6
    # Round 2: the one round it planned for is spent.
    declined = _ask_client(cfg, context, MessageType.TRAIN, {ARRAYS: start}, rnd=2)
    assert declined.has_error()
    screening = strategy.screen([declined], 2, start)
    (excluded,) = screening.excluded
    assert excluded["code"] == ERR_DP_BUDGET_SPENT and DP_BUDGET_SPENT in excluded["reason"]
    assert privacy_record(cfg, strategy, [], screening.excluded, 2, [rec])["dp"]["declined"] == 1
    assert budgets_spent(screening.excluded)
