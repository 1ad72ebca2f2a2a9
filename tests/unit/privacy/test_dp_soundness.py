"""The privacy guarantees hold against the adversaries they name.

- The server (or anyone with the run config) cannot recompute a client's DP noise: it
  comes from the institution's secret, not from public values.
- The ledger accounts what ran, on every clipping path.
- A private client releases nothing outside the accounting.
- Central DP is accounted at the noise the aggregate really carries, and the releases
  of every allowed strategy stay within the calibrated sensitivity.
- The institution's node config caps its budget; FedProx is not dropped under DP.
"""

import copy
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import he
from client.app import build_client_app
from client.mods import typed_errors
from client.privacy import check_sampled_clients, federation_size, private_seeds
from client.task import build_backbone_only
from crypto.envelope import EnvelopeError
from crypto.seeds import SecretFileError, derive_seed, load_or_create_secret
from fedface.config import STRATEGY_NAMES, RunConfig
from fedface.data.prepare import ClientData
from fedface.models import build_backbone, build_head
from fedface.privacy import (
    PrivacyBudgetExhausted,
    PrivacyConfigError,
    PrivacyLedger,
    central_epsilon,
    effective_noise_multiplier,
    epsilon_of,
    make_private,
    plan_dp,
    plan_for_run,
)
from fedface.protocol import (
    ARRAYS,
    CONFIG,
    DP_BUDGET_SPENT,
    DP_RELEASABLE,
    ERR_CLIENT,
    ERR_DP_BUDGET_SPENT,
    ERR_KEY_MISMATCH,
    ERR_OUT_OF_SYNC,
    ERR_PRIVACY_REFUSED,
    ERR_RELEASE_REFUSED,
    METRICS,
    NUM_EXAMPLES,
    TRAIN_LOSS,
    UNIT_WEIGHT,
    TrainInstructions,
    backbone_record,
    numpy_record,
)
from fedface.training import make_optimizer, train_epochs
from tests.fakes import Reply

SIZE, CLASSES, N = 32, 4, 40


@pytest.fixture
def client_file(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(N) % CLASSES
    base = rng.integers(0, 255, (CLASSES, SIZE, SIZE, 3))
    x = np.clip(base[y] + rng.normal(0, 20, (N, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    path = tmp_path / "site.npz"
    ClientData(x, y, x[:12], np.arange(12) % 4).save(path)
    return path


def _cfg(**changes) -> RunConfig:
    base = dict(image_size=SIZE, embedding_size=32, batch_size=10, rounds=2, local_epochs=1,
                dp_epsilon=8.0)
    return RunConfig(**{**base, **changes})


def _context(cfg: RunConfig, data: Path, state: Path | None, **node) -> Context:
    node_config = {"data-path": str(data), **node}
    if state is not None:
        node_config["state-dir"] = str(state)
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=cfg.to_run_config())


def _train(cfg: RunConfig, context: Context, server_round: int = 1) -> Message:
    torch.manual_seed(cfg.seed)
    start = backbone_record(build_backbone_only(cfg))
    ins = TrainInstructions(server_round=server_round, lr=0.1, local_epochs=1)
    msg = Message(RecordDict({ARRAYS: start, CONFIG: ins.to_record()}), dst_node_id=7,
                  message_type=MessageType.TRAIN)
    return build_client_app()(msg, context)


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    assert not reply.has_error(), reply.error
    return {k: a.numpy() for k, a in reply.content[ARRAYS].items()}


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------- secret randomness
def test_dp_noise_comes_from_the_institutions_secret_not_the_run_config(
        tmp_path, client_file, flower_task):
    """The server's attack: it knows the run config, the node and the round, and (worst
    case) the data; it re-runs the client to recompute the noise. It gets another model,
    while the institution itself, reading its secret, replays the round bit for bit."""
    cfg = _cfg()
    site = _arrays(_train(cfg, _context(cfg, client_file, tmp_path / "site")))
    secret = tmp_path / "site" / "private_randomness.key"
    assert secret.stat().st_size == 32 and stat.S_IMODE(secret.stat().st_mode) == 0o600
    # The attacker's replay: everything public and the data, but not the secret.
    attacker = _arrays(_train(cfg, _context(cfg, client_file, tmp_path / "attacker")))
    assert not _same(site, attacker)
    # Another institution with the same run config, node id and round: other noise.
    other = _arrays(_train(cfg, _context(cfg, client_file, tmp_path / "other")))
    assert not _same(site, other) and not _same(attacker, other)
    # A restarted (resumed) client of the same institution: the same round, bit for bit.
    for f in (tmp_path / "site").glob("*"):
        if f != secret:
            f.unlink()  # a fresh head and ledger, as at the start of the round
    again = _arrays(_train(cfg, _context(cfg, client_file, tmp_path / "site")))
    assert _same(site, again)
    # Without DP the public seed still makes training reproducible run to run.
    plain = _cfg(dp_epsilon=0.0)
    a = _arrays(_train(plain, _context(plain, client_file, tmp_path / "p1")))
    b = _arrays(_train(plain, _context(plain, client_file, tmp_path / "p2")))
    assert _same(a, b)
    assert not (tmp_path / "p1" / "private_randomness.key").exists()


def _norm_of_difference(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(np.square(a[k].astype(np.float64) - b[k]).sum())
                         for k in a if a[k].dtype.kind == "f"))


def test_one_institution_never_reuses_noise_on_different_inputs(tmp_path, client_file,
                                                                 flower_task):
    """The same institution (the same secret, as across its runs) trains on a data
    snapshot that differs in one image. Were the noise reused, the two releases would
    differ by about one image's clipped contribution and reveal it; the draws are bound
    to the inputs, so they differ by independent noise, as much as two institutions'."""
    cfg = _cfg()
    first = _arrays(_train(cfg, _context(cfg, client_file, tmp_path / "site")))
    with np.load(client_file) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["x_train"][0] = 255 - arrays["x_train"][0]  # one patient's photo changed
    changed = tmp_path / "snapshot2.npz"
    ClientData(arrays["x_train"], arrays["y_train"], arrays["x_val"], arrays["y_val"]).save(changed)
    for f in (tmp_path / "site").glob("*"):
        if not f.name.endswith(".key"):
            f.unlink()  # a new run: the institution keeps only its secret
    second = _arrays(_train(cfg, _context(cfg, changed, tmp_path / "site")))
    independent = _arrays(_train(cfg, _context(cfg, client_file, tmp_path / "other")))
    reference = _norm_of_difference(first, independent)
    assert _norm_of_difference(first, second) > 0.5 * reference > 0
    # The draws themselves: bound to the inputs, not just to the secret and the round.
    from client.privacy import private_seeds

    ctx = _context(cfg, client_file, tmp_path / "site")
    ins = TrainInstructions(server_round=1)
    a, b = (private_seeds(ctx, ins, 7, np.array([x])).of("dp-noise") for x in (1.0, 1.5))
    assert a != b and private_seeds(ctx, ins, 7, np.array([1.0])).of("dp-noise") == a


def test_the_secret_is_owner_only_and_refused_when_exposed(tmp_path):
    path = tmp_path / "s.key"
    first = load_or_create_secret(path)
    assert load_or_create_secret(path) == first and load_or_create_secret(tmp_path / "t.key") != first
    assert derive_seed(first, "dp-noise", 1) != derive_seed(first, "dp-noise", 2)
    assert derive_seed(first, "dp-noise", 1) != derive_seed(first, "dp-sampling", 1)
    os.chmod(path, 0o644)
    with pytest.raises(SecretFileError, match="readable by other users.*chmod 600"):
        load_or_create_secret(path)
    os.chmod(path, 0o600)
    link = tmp_path / "link.key"
    link.symlink_to(path)
    with pytest.raises(SecretFileError, match="symbolic link"):
        load_or_create_secret(link)
    path.write_bytes(b"short")
    with pytest.raises(SecretFileError, match="holds 5 bytes"):
        load_or_create_secret(path)


def test_without_a_state_folder_the_secret_lives_in_the_nodes_memory():
    context = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    ins = TrainInstructions(server_round=4)
    a = private_seeds(context, ins, 3).of("dp-noise")
    assert private_seeds(context, ins, 3).of("dp-noise") == a  # same process: same secret
    fresh = Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})
    assert private_seeds(fresh, ins, 3).of("dp-noise") != a  # no public value determines it


# ------------------------------------------------------------- the ledger records what ran
def _faces(n, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    base = rng.integers(0, 255, (classes, SIZE, SIZE, 3))
    return np.clip(base[y] + rng.normal(0, 20, (n, SIZE, SIZE, 3)), 0, 255).astype(np.uint8), y


@pytest.mark.parametrize("head,mode", [("softmax", "bk"), ("cosface", "bk"), ("softmax", "hooks")])
def test_the_ledger_accounts_the_steps_and_rate_that_ran(tmp_path, head, mode):
    """N=39, B=10: N/B is not an integer. Opacus' own loader ran ceil(N/B)=4 steps at
    rate 1/4 where the ledger said 3 at 10/39 (7.99 of a budget of 8, against 9.05
    spent); now every path (cosface falls back to Opacus hooks) runs what it accounts."""
    x, y = _faces(39)
    plan = plan_dp(39, epsilon=8.0, rounds=2, local_epochs=2, batch_size=10)
    torch.manual_seed(0)
    backbone = build_backbone("tinyface", embedding_size=32, input_size=SIZE)
    model_head = build_head(head, 32, 4)
    opt = make_optimizer(backbone, model_head, 0.1, 0.9, 0.0)
    private = make_private(backbone, model_head, opt, plan, seed=1, grad_sample_mode=mode)
    assert private.mode == ("hooks" if head == "cosface" else mode)
    steps = {"n": 0}
    step = private.optimizer.step
    private.optimizer.step = lambda: (steps.__setitem__("n", steps["n"] + 1), step())[1]
    res = train_epochs(backbone, model_head, x, y, epochs=2, optimizer=private.optimizer,
                       batches=private.batches, forward=private.forward,
                       on_empty=private.empty_step)
    ledger = PrivacyLedger.load(tmp_path / "ledger.json")
    spent = ledger.record(1, plan, ran=private.accounted())
    # What ran, counted independently: the optimizer's steps (plus noise-only steps of
    # empty draws), the sampler's rate, the optimizer's noise.
    assert res.steps == private.steps_taken == 2 * 3 and steps["n"] <= res.steps
    sigma = private.optimizer.noise_multiplier * (
        private.optimizer.max_grad_norm if mode == "hooks" or head == "cosface"
        else private.keeper.max_grad_norm) / plan.max_grad_norm
    assert sigma == pytest.approx(plan.noise_multiplier)
    assert spent == pytest.approx(epsilon_of([(sigma, 10 / 39, res.steps)], plan.delta, "prv"))
    assert PrivacyLedger.load(tmp_path / "ledger.json").history == [[sigma, 10 / 39, 6]]
    # The plan's two rounds of what runs spend the budget: no more, no less.
    again = ledger.record(2, plan, ran=private.accounted())
    assert 0 < spent < again and again == pytest.approx(8.0, abs=0.02)


# ------------------------------------------------------------- no unaccounted releases
def test_a_private_client_releases_only_accounted_figures(tmp_path, client_file, flower_task):
    """What the server receives from a DP client: the update and the listed counts and
    accounting, no loss, norm, timing or validation score of private people."""
    cfg = _cfg()
    context = _context(cfg, client_file, tmp_path / "s")
    reply = _train(cfg, context)
    keys = set(reply.content[METRICS].keys())
    assert keys <= DP_RELEASABLE and TRAIN_LOSS not in keys
    assert set(reply.content.array_records) == {ARRAYS}
    ins = TrainInstructions(server_round=1)
    ev = Message(RecordDict({ARRAYS: reply.content[ARRAYS], CONFIG: ins.to_record()}),
                 dst_node_id=7, message_type=MessageType.EVALUATE)
    scored = build_client_app()(ev, context)
    assert not any(k.startswith("val-") for k in scored.content[METRICS].keys())
    # The same client without DP reports its loss and validation scores: the filter is
    # what removed them.
    plain = _cfg(dp_epsilon=0.0)
    pc = _context(plain, client_file, tmp_path / "p")
    assert TRAIN_LOSS in _train(plain, pc).content[METRICS]
    assert "val-accuracy" in build_client_app()(ev, pc).content[METRICS]


# ------------------------------------------------------------- the institution's budget
def test_the_node_config_caps_what_a_run_may_spend(tmp_path, client_file, flower_task):
    def reason(cfg, **node):  # the refusal travels as a typed error reply
        reply = _train(cfg, _context(cfg, client_file, tmp_path / str(len(node)), **node))
        if not reply.has_error():
            return ""
        assert reply.error.code == ERR_PRIVACY_REFUSED, reply.error
        return reply.error.reason

    assert "at most dp-epsilon=4" in reason(_cfg(dp_epsilon=8.0), **{"dp-epsilon": 4.0})
    assert "no DP-SGD" in reason(_cfg(dp_epsilon=0.0), **{"dp-epsilon": 4.0})
    assert "at most dp-delta=1e-06" in reason(_cfg(dp_epsilon=4.0), **{"dp-delta": 1e-6})
    assert reason(_cfg(dp_epsilon=4.0), **{"dp-epsilon": 4.0, "dp-delta": 1e-5}) == ""
    assert "only person-level DP-SGD" in reason(_cfg(dp_epsilon=4.0), **{"dp-unit": "person"})
    # The server cannot switch off an institution's encryption by leaving he-keys out.
    assert "encrypted only" in reason(_cfg(dp_epsilon=0.0), **{"he-keys": str(tmp_path)})


def _evaluate(cfg: RunConfig, context: Context, record) -> Message:
    ins = TrainInstructions(server_round=1)
    msg = Message(RecordDict({ARRAYS: record, CONFIG: ins.to_record()}), dst_node_id=7,
                  message_type=MessageType.EVALUATE)
    return build_client_app()(msg, context)


def test_an_institution_with_a_budget_scores_nothing_even_in_a_run_without_dp(
        tmp_path, client_file, flower_task):
    """The server's probe: a run without DP, which the institution refuses to train in,
    still sends it models to score on its private validation people. It scores none."""
    plain = _cfg(dp_epsilon=0.0)
    model = backbone_record(build_backbone_only(plain))
    capped = _evaluate(plain, _context(plain, client_file, tmp_path / "c", **{"dp-epsilon": 4.0}),
                       model)
    assert not capped.has_error()
    assert set(capped.content[METRICS].keys()) <= DP_RELEASABLE
    assert capped.content[METRICS][NUM_EXAMPLES] == 1  # not its count of private pairs
    free = _evaluate(plain, _context(plain, client_file, tmp_path / "f"), model)
    assert "val-accuracy" in free.content[METRICS]  # the same client without a cap scores


def test_person_level_dp_reports_person_slots_not_image_counts(tmp_path, client_file,
                                                               flower_task):
    """The image count changes with one person's images: under dp-unit=person the reply
    (and the weights it drives) carries the public number of person slots."""
    person = _cfg(dp_unit="person", batch_size=2)
    reply = _train(person, _context(person, client_file, tmp_path / "p"))
    assert not reply.has_error(), reply.error
    assert reply.content[METRICS][NUM_EXAMPLES] == CLASSES
    image = _train(_cfg(), _context(_cfg(), client_file, tmp_path / "i"))
    assert image.content[METRICS][NUM_EXAMPLES] == N


def test_a_deployed_node_keeps_its_budget_where_its_own_config_says(tmp_path):
    """A server naming a fresh state folder in its instructions cannot reset a deployed
    institution's ledger or secret; only the simulation's nodes use the run's folder."""
    from client.privacy import ledger_path, secret_path

    ins = TrainInstructions(state_dir=str(tmp_path / "server-chosen"))
    deployed = Context(run_id=1, node_id=9, node_config={}, state=RecordDict(), run_config={})
    assert ledger_path(deployed, ins, 9) is None and secret_path(deployed, ins, 9) is None
    simulated = Context(run_id=1, node_id=9, node_config={"partition-id": 2}, state=RecordDict(),
                        run_config={})
    assert ledger_path(simulated, ins, 2) == tmp_path / "server-chosen" / "client_002_privacy.json"
    own = Context(run_id=1, node_id=9, node_config={"state-dir": str(tmp_path / "own")},
                  state=RecordDict(), run_config={})
    assert secret_path(own, ins, 9) == tmp_path / "own" / "private_randomness.key"


def test_a_fifo_in_place_of_the_secret_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "s.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecretFileError, match="not a regular file"):
        load_or_create_secret(fifo)


def test_a_client_whose_budget_is_spent_declines_with_a_typed_error(tmp_path, client_file,
                                                                      flower_task):
    """The server reads the decline's code, not its text: a spent ledger replies
    ERR_DP_BUDGET_SPENT (the reason still says what happened), and nothing trains."""
    cfg = _cfg()
    state = tmp_path / "spent"
    plan = plan_for_run(cfg, N, CLASSES, "client 7")
    ledger = PrivacyLedger.load(state / "privacy_ledger.json")
    for rnd in range(1, cfg.rounds + 1):
        ledger.record(rnd, plan, plan.steps_per_round)
    reply = _train(cfg, _context(cfg, client_file, state), server_round=cfg.rounds + 1)
    assert reply.has_error() and reply.error.code == ERR_DP_BUDGET_SPENT
    assert reply.error.reason.startswith(DP_BUDGET_SPENT)
    assert not list(state.glob("head_r*.pt"))  # declined before training


@pytest.mark.parametrize("err,code", [
    (PrivacyBudgetExhausted("privacy budget exhausted: ..."), ERR_DP_BUDGET_SPENT),
    (he.OutOfSync("out of sync: ..."), ERR_OUT_OF_SYNC),
    (PrivacyConfigError("this institution allows at most ..."), ERR_PRIVACY_REFUSED),
    (he.KeyMismatch("key mismatch: ..."), ERR_KEY_MISMATCH),
    (he.ReleaseRefused("release refused: ..."), ERR_RELEASE_REFUSED),
    (he.AggregateRefused("a second, different aggregate ..."), ERR_RELEASE_REFUSED),
    (FileNotFoundError("Client data x.npz is missing"), ERR_CLIENT),
    (EnvelopeError("authentication tag of sender 1 does not verify"), ERR_CLIENT),
])
def test_every_decline_and_failure_replies_its_code_and_text(err, code, flower_task):
    app = ClientApp(mods=[typed_errors])

    @app.train()
    def train(msg, context):
        raise err

    msg = Message(RecordDict({CONFIG: TrainInstructions().to_record()}), dst_node_id=7,
                  message_type=MessageType.TRAIN)
    reply = app(msg, Context(run_id=1, node_id=7, node_config={}, state=RecordDict(),
                             run_config={}))
    assert (reply.error.code, reply.error.reason) == (code, str(err))


def test_a_sampled_count_larger_than_the_federation_is_refused():
    assert federation_size({"num-partitions": 4}) == 4
    assert federation_size({"num-partitions": 4}, ceremony_size=6) == 6
    assert federation_size({"federation-size": 5, "num-partitions": 4}, 6) == 5
    check_sampled_clients(TrainInstructions(sampled_clients=4), 4)
    with pytest.raises(PrivacyConfigError, match="shrink this client's central-DP noise"):
        check_sampled_clients(TrainInstructions(sampled_clients=100), 4)


# ------------------------------------------------------------- central DP
def test_central_dp_is_accounted_at_the_noise_that_was_aggregated():
    """The reviewer's case: 8 of 8 sampled, noise 1, 16 rounds: 25.9 as reported; with 2
    replies per round the client-fixed release carries half the noise: 68.6 against the
    server; a fellow institution, which subtracts its own share, faces one share: 116."""
    assert central_epsilon(1.0, 1.0, 16, 1e-5) == pytest.approx(25.93, abs=0.01)
    z = effective_noise_multiplier("client-fixed", 1.0, sampled=8, aggregated=2, insider=False)
    assert z == pytest.approx(0.5)
    assert central_epsilon([z] * 16, 1.0, None, 1e-5) == pytest.approx(68.62, abs=0.01)
    inside = effective_noise_multiplier("client-fixed", 1.0, sampled=8, aggregated=2)
    assert inside == pytest.approx(math.sqrt(1 / 8))
    assert central_epsilon([inside] * 16, 1.0, None, 1e-5) > 110
    # Even with every institution replying, an insider faces m-1 shares of the noise.
    assert effective_noise_multiplier("client-fixed", 1.0, 8, 8) == pytest.approx(math.sqrt(7 / 8))
    assert effective_noise_multiplier("server-fixed", 1.0, 8, 2) == pytest.approx(0.25)
    assert effective_noise_multiplier("server-fixed", 1.0, 8, 8) == 1.0
    # Measured: the mean of r client-fixed shares carries std z C sqrt(r/m) / r.
    from fedface.privacy import clip_and_noise_update

    rng = np.random.default_rng(0)
    zero = {"w": np.zeros(40_000, np.float32)}
    shares = [clip_and_noise_update(zero, zero, clip=1.0, noise_multiplier=1.0,
                                    num_sampled_clients=8, rng=rng)[0]["w"] for _ in range(2)]
    measured = float(np.mean(shares, axis=0).std()) * 2 / 1.0  # std over sensitivity C/r
    assert measured == pytest.approx(z, rel=0.02)


def test_privacy_record_composes_each_rounds_effective_noise():
    from fedface.privacy import privacy_record

    cfg = RunConfig(num_clients=8, min_train_nodes=2, central_dp="server-fixed",
                    central_dp_noise=1.0)
    full = privacy_record(cfg, object(), [Reply(i) for i in range(8)], [], 1, [])
    assert full["central_dp"]["noise_multiplier_effective"] == 1.0
    rounds = [full]
    for rnd in range(2, 17):
        rounds.append(privacy_record(cfg, object(), [Reply(0), Reply(1)], [], rnd, rounds))
    last = rounds[-1]["central_dp"]
    assert last["aggregated"] == 2 and last["noise_multiplier_effective"] == 0.25
    assert last["epsilon"] == pytest.approx(central_epsilon([1.0] + [0.25] * 15, 1.0, None, 1e-5))
    assert last["epsilon"] > 5 * last["epsilon_if_all_replied"]


REF = {"w": np.zeros((6, 5), np.float32), "b": np.zeros(5, np.float32)}


def _update(node: int, value: float) -> Reply:
    arrays = {k: np.full(v.shape, value, np.float32) for k, v in REF.items()}
    return Reply(node, RecordDict({ARRAYS: numpy_record(arrays),
                                   METRICS: MetricRecord({NUM_EXAMPLES: 10, UNIT_WEIGHT: 1,
                                                          "train-steps": 1})}))


def _release(strategy, rnd: int, replies, current: dict, clip: float | None) -> dict:
    strategy.current_arrays = numpy_record(current)
    inner = strategy.strategy
    inner.current_arrays = (current if hasattr(inner, "momentum") or type(inner).__name__ == "FedAdam"
                            else numpy_record(current))
    inner.round_lr = 0.1
    if clip is not None:
        strategy.clipping_norm = clip
    agg, _ = strategy.aggregate_train(rnd, copy.deepcopy(replies))
    return {k: a.numpy().astype(np.float64) for k, a in agg.items()}


def _dist(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(np.square(a[k] - b[k]).sum()) for k in a))


def _pairs(allowed: bool):
    out = []
    for name in STRATEGY_NAMES:
        for mode in ("server-fixed", "server-adaptive"):
            try:
                RunConfig(strategy=name, central_dp=mode, num_clients=3, min_train_nodes=3)
                ok = True
            except ValueError:
                ok = False
            if ok == allowed:
                out.append((name, mode))
    return out


@pytest.mark.parametrize("name,mode", _pairs(allowed=True))
def test_every_allowed_server_side_pair_releases_within_the_calibrated_bound(name, mode):
    """The adversary sees every release. Neighbouring inputs (one client's update replaced
    by an extreme one) may move a release by at most 2C/m, in the round they differ and
    in a later round whose public inputs are the same: no hidden server state carries
    the difference on."""
    from server.strategies import build_strategy

    cfg = RunConfig(strategy=name, central_dp=mode, central_dp_noise=0.0, central_dp_clip=1.0,
                    num_clients=3, min_train_nodes=3)
    honest = [_update(1, 0.01), _update(2, -0.02), _update(3, 0.03)]
    neighbour = honest[:2] + [_update(3, 50.0)]
    worlds = [build_strategy(cfg), build_strategy(cfg)]
    start = {k: v.copy() for k, v in REF.items()}
    r1 = [_release(s, 1, d, start, 1.0) for s, d in zip(worlds, (honest, neighbour))]
    bound = 2 * 1.0 / 3 + 1e-6
    assert 0.0 < _dist(*r1) <= bound
    # Round 2: the same public model and clip in both worlds, the same replies.
    r2 = [_release(s, 2, honest, r1[0], 1.0) for s in worlds]
    assert _dist(*r2) <= 1e-6


@pytest.mark.parametrize("name,mode", _pairs(allowed=False))
def test_refused_server_side_pairs_would_carry_noiseless_state(name, mode):
    """Why they are refused: built anyway, the server optimizer carries round 1's
    difference into round 2, whose public inputs are the same in both worlds."""
    from flwr.serverapp.strategy import (
        DifferentialPrivacyServerSideAdaptiveClipping as Adaptive,
    )
    from flwr.serverapp.strategy import (
        DifferentialPrivacyServerSideFixedClipping as Fixed,
    )

    from server.strategies import STRATEGIES

    cfg = RunConfig(strategy=name, num_clients=3, min_train_nodes=3)
    noise = 0.1 if name == "pfm" else 0.0
    wrap = (lambda s: Fixed(s, noise_multiplier=noise, clipping_norm=1.0, num_sampled_clients=3)
            ) if mode == "server-fixed" else (
        lambda s: Adaptive(s, noise_multiplier=noise, num_sampled_clients=3,
                           initial_clipping_norm=1.0))
    worlds = [wrap(STRATEGIES[name](cfg)), wrap(STRATEGIES[name](cfg))]
    honest = [_update(1, 0.01), _update(2, -0.02), _update(3, 0.03)]
    if name == "pfm":
        # PFM sends its momentum to every client; it is estimated before the noise is
        # added: two noise draws give two models but the very same momentum.
        start = {k: v.copy() for k, v in REF.items()}
        models = [_release(s, 1, honest, start, 1.0) for s in worlds]
        assert _dist(*models) > 1e-4
        m0, m1 = (s.strategy.momentum for s in worlds)
        assert all(np.array_equal(m0[k], m1[k]) for k in m0) and any(m0[k].any() for k in m0)
        with pytest.raises(ValueError, match="refused"):
            RunConfig(strategy=name, central_dp=mode, num_clients=3, min_train_nodes=3)
        return
    neighbour = honest[:2] + [_update(3, 50.0)]
    start = {k: v.copy() for k, v in REF.items()}
    r1 = [_release(s, 1, d, start, 1.0) for s, d in zip(worlds, (honest, neighbour))]
    r2 = [_release(s, 2, honest, r1[0], 1.0) for s in worlds]
    assert _dist(*r2) > 1e-4  # hidden state: the release depends on more than its inputs
    with pytest.raises(ValueError, match="refused"):
        RunConfig(strategy=name, central_dp=mode, num_clients=3, min_train_nodes=3)


# ------------------------------------------------------------- FedProx under DP
@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_fedprox_pulls_towards_the_start_under_dp_sgd(mode):
    """The proximal term is applied (decoupled, after the private step) instead of being
    dropped: with the same private draws, mu > 0 moves every backbone weight by exactly
    -lr * mu * (w - w_start) more than mu = 0."""
    x, y = _faces(40)
    plan = plan_dp(40, epsilon=8.0, rounds=1, local_epochs=1, batch_size=10)
    ends, starts = [], None
    for mu in (0.0, 0.5):
        torch.manual_seed(0)
        backbone = build_backbone("tinyface", embedding_size=32, input_size=SIZE)
        head = build_head("softmax", 32, 4)
        starts = [p.detach().clone() for p in backbone.parameters()]
        opt = make_optimizer(backbone, head, 0.1, 0.0, 0.0)
        private = make_private(backbone, head, opt, plan, seed=3, grad_sample_mode=mode)
        batch = next(iter(private.batches()))
        train_epochs(backbone, head, x, y, optimizer=private.optimizer, proximal_mu=mu,
                     batches=lambda g, b=batch: iter([b]), forward=private.forward, seed=1)
        ends.append([p.detach().clone() for p in backbone.parameters()])
    moved = False
    for plain, prox, w0 in zip(ends[0], ends[1], starts):
        torch.testing.assert_close(prox, plain - 0.1 * 0.5 * (plain - w0), rtol=1e-5, atol=1e-6)
        moved |= bool((plain != w0).any())
    assert moved


# ------------------------------------------------------------- refused configurations
@pytest.mark.parametrize("changes,needle", [
    (dict(central_dp="client-fixed"), "client-fixed without he_keys is refused"),
    (dict(strategy="fedavgm", central_dp="server-fixed"), "strategy=fedavgm with central_dp"),
    (dict(strategy="fedadam", central_dp="server-adaptive"), "strategy=fedadam with central_dp"),
    (dict(fv=True, dp_epsilon=8.0), "fv with dp_epsilon is refused"),
])
def test_unsound_combinations_are_refused_with_the_reason(changes, needle):
    with pytest.raises(ValueError, match="Invalid run configuration") as err:
        RunConfig(**changes)
    assert needle in str(err.value)


def test_server_adaptive_central_dp_builds_at_the_default_noise():
    """Flower's default clipped-count noise (m/20) is refused for 8 clients at noise 1:
    fedface sets it so that the count and the model compose to the requested noise."""
    from server.strategies import build_strategy

    for m, z in ((8, 1.0), (3, 0.5), (40, 1.0)):
        s = build_strategy(RunConfig(central_dp="server-adaptive", num_clients=m,
                                     min_train_nodes=2, central_dp_noise=z))
        assert s.clipped_count_stddev >= max(m / 20, z) - 1e-12


def test_server_side_dp_screens_no_update_against_the_others_and_records_no_norm():
    """Norm screening relative to the round's median lets one client's presence decide
    whether another is aggregated (a change of 2C against noise calibrated to C), and the
    pre-clip norms are private: under server-side central DP neither happens, and a reply
    that weights itself down is refused."""
    from server.strategies import build_strategy

    def reply(node, value, weight=1):
        r = _update(node, value)
        r.content[METRICS][UNIT_WEIGHT] = weight
        return r

    replies = [reply(1, 0.01), reply(2, 0.011), reply(3, 0.012), reply(4, 5.0), reply(5, 0.01, 1e-6)]
    ref = numpy_record(REF)
    plain = build_strategy(RunConfig(num_clients=5, min_train_nodes=2))
    s = plain.screen(replies, 1, ref)
    assert 4 in {e["node"] for e in s.excluded} and s.update_norms  # plaintext: screened
    for mode in ("server-fixed", "server-adaptive"):
        dp = build_strategy(RunConfig(num_clients=5, min_train_nodes=2, central_dp=mode))
        s = dp.screen(replies, 1, ref)
        assert sorted(int(m.metadata.src_node_id) for m in s.good) == [1, 2, 3, 4]
        assert [e["node"] for e in s.excluded] == [5] and "unit-weight" in s.excluded[0]["reason"]
        assert s.update_norms == {}


def test_central_dp_claims_no_amplification_by_sampling():
    """Who takes part is visible to the server and the institutions: half the clients
    sampled per round is accounted like every client every round."""
    from fedface.privacy import privacy_record

    half = RunConfig(num_clients=8, min_train_nodes=4, fraction_train=0.5,
                     central_dp="server-fixed", central_dp_noise=1.0)
    rec = privacy_record(half, object(), [Reply(i) for i in range(4)], [], 1, [])
    assert rec["central_dp"]["epsilon"] == pytest.approx(central_epsilon(1.0, 1.0, 1, 1e-5))
