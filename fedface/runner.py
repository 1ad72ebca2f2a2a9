"""Run a training job: federated (Flower simulation) or centralized, same data and model.

:func:`run` is what ``fedface train`` and ``fedface demo`` call. Federated runs start
Flower's simulation engine with fedface's ServerApp and ClientApp (one virtual
SuperNode per institution); centralized runs train the same backbone on the pooled
data of all institutions with one head, for ``rounds x local_epochs`` epochs.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import torch

from fedface.config import RunConfig
from fedface.data.partition import verification_pairs
from fedface.data.prepare import prepare
from fedface.metrics import RunRecorder, finalize_run
from fedface.models import build_head, initial_backbone
from fedface.progress import ProgressFn
from fedface.training import (
    cosine_lr,
    make_optimizer,
    round_test_metrics,
    train_epochs,
    verify_pairs,
)


def run(cfg: RunConfig, progress: ProgressFn | None = None, quiet: bool = True,
        resume: bool = False) -> dict:
    """Train as ``cfg.mode`` says; returns the metrics document (also in ``metrics.json``).

    ``resume=True`` continues a stopped federated run from ``cfg.out/checkpoint.pt``.
    """
    if cfg.mode == "centralized":
        if resume:
            raise ValueError("--resume applies to federated runs; centralized runs keep no "
                             "checkpoint (they are the quick baseline)")
        return run_centralized(cfg, progress)
    return run_simulation(cfg, progress, quiet=quiet, resume=resume)


def resume_config(out_dir: str, **changes) -> RunConfig:
    """The settings of the run checkpointed in ``out_dir`` (``rounds`` may be raised)."""
    from server.checkpoint import load_checkpoint

    saved = load_checkpoint(out_dir)["config"]
    return RunConfig.from_run_config(saved, out=str(out_dir), pause_after=0,
                                     **{k: v for k, v in changes.items() if v is not None})


def run_simulation(cfg: RunConfig, progress: ProgressFn | None = None, quiet: bool = True,
                   resume: bool = False) -> dict:
    """A federated run of ``cfg.num_clients`` simulated institutions on this machine."""
    from client.app import build_client_app
    from fedface.privacy import check_privacy
    from server.app import build_server_app

    if resume:  # a checkpoint it cannot continue is refused before anything starts
        from server.loop import check_resume

        check_resume(cfg)
    # Prepare (align, partition) and check DP budgets before the engine starts, so
    # failures surface early and the progress bar is not interleaved with its start-up.
    prepared = prepare(cfg, progress=progress)
    check_privacy(cfg, prepared.summary)
    result: dict = {}
    overrides = cfg.to_run_config()
    server_app = build_server_app(overrides, progress=progress, result=result, resume=resume)
    client_app = build_client_app(overrides)
    _simulate(server_app, client_app, cfg.num_clients, cfg.num_cpus_per_client, quiet)
    if isinstance(result.get("error"), Exception):
        raise result["error"]
    if not result:
        raise RuntimeError(
            "The federated run ended without results: see the Flower log above "
            "(re-run with --verbose for the clients' output)"
        )
    return result


def _simulate(server_app, client_app, supernodes: int, num_cpus: float, quiet: bool) -> None:
    """Flower's simulation engine on this machine, its log quiet unless asked."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    backend = {"client_resources": {"num_cpus": num_cpus, "num_gpus": 0.0},
               "init_args": {"logging_level": "ERROR", "log_to_driver": not quiet,
                             "include_dashboard": False}}
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        if quiet:
            flwr_logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flwr_run_simulation(server_app=server_app, client_app=client_app,
                                num_supernodes=supernodes, backend_config=backend)
    finally:
        flwr_logger.setLevel(level)


def run_query_simulation(request, verify_keys: dict, sites: int, site_defaults: dict, *,
                         exclude_refusing: bool = False, quiet: bool = True):
    """One encrypted analytics query (its public :class:`server.analytics.QueryRequest`)
    across ``sites`` simulated institutions (Flower's simulation engine, fedface's ServerApp
    and ClientApp); returns the :class:`server.analytics.EncryptedTotal`. ``site_defaults``
    are the sites' settings (:class:`client.analytics.SiteSettings`: ``table`` with
    ``{partition}``, ``keys``, ``state_dir``, ``budget``, ``exact``)."""
    from client.app import build_client_app
    from server.app import build_query_server_app

    result: dict = {}
    server_app = build_query_server_app(request, verify_keys, result, sites=sites,
                                        exclude_refusing=exclude_refusing)
    _simulate(server_app, build_client_app(analytics=site_defaults), sites, 1.0, quiet)
    if isinstance(result.get("error"), Exception):
        raise result["error"]
    if "total" not in result:
        raise RuntimeError("the query ended without an answer: see the Flower log above "
                           "(re-run with --verbose)")
    return result["total"]


def in_process_transport(contexts: dict, settings: dict, drop=None, tamper=None, outgoing=None):
    """Sites answering in this process (node id -> its Context and
    :class:`client.analytics.SiteSettings`), one after another, through their real handler
    (:func:`client.analytics.handle`): a :data:`server.analytics.Transport`. ``drop(step,
    node)`` makes a node silent at a step; ``tamper(step, node, reply)`` and
    ``outgoing(step, node, content)`` play the network (or a server) on the way back and
    out."""
    from client.analytics import handle
    from crypto.masks import unpack_doc
    from fedface.analytics.wire import STEP

    def transport(docs: dict) -> dict:
        out = {}
        for node, content in docs.items():
            step = unpack_doc(content.config_records[STEP], "step")["step"]
            if drop is not None and drop(step, node):
                continue
            if outgoing is not None:
                content = outgoing(step, node, content)
            try:
                reply = handle(contexts[node], settings[node], content)
            except Exception as err:  # noqa: BLE001 - a site's refusal is its reply
                out[node] = f"{type(err).__name__}: {err}"
                continue
            out[node] = tamper(step, node, reply) if tamper is not None else reply
        return out

    return transport


def run_query_in_process(request, verify_keys: dict, sites: int, site_defaults: dict, *,
                         exclude_refusing: bool = False):
    """The same query with the sites answering in this process, one after another (no
    Flower transport): what ``fedface query --in-process`` and ``fedface bench query`` run.
    Each site has its own node context, settings and keys, exactly as in a run. Returns
    the :class:`server.analytics.EncryptedTotal`."""
    from flwr.app import Context, RecordDict

    from client.analytics import SiteSettings
    from server.analytics import run_query

    contexts = {k + 1: Context(run_id=1, node_id=k + 1, node_config={"partition-id": k},
                               state=RecordDict(), run_config={}) for k in range(sites)}
    settings = {n: SiteSettings.of(c, site_defaults) for n, c in contexts.items()}
    return run_query(request, verify_keys, in_process_transport(contexts, settings),
                     sorted(contexts), exclude_refusing=exclude_refusing)


def ask_query(spec, schema, keys_dir, sites: int, site_defaults: dict, *,
              engine: str = "simulation", text: str = "", exclude_refusing: bool = False,
              quiet: bool = True, **query):
    """One encrypted analytics query: a :class:`server.analytics.Querier` (a fresh key,
    signed with the ceremony's querier key in ``keys_dir``) asks ``sites`` institutions
    through ``engine`` (``simulation``: Flower's engine; ``in-process``: the sites' handler
    called directly). ``query`` holds the querier's settings (epsilon, delta, min_cell,
    frac_bits, settings, max_sites). Returns the :class:`server.analytics.QueryResult`."""
    from crypto.keys import load_querier_key, load_server_keys
    from server.analytics import Querier

    server = load_server_keys(keys_dir)
    querier = Querier(spec, schema, load_querier_key(keys_dir), text=text, **query)
    if engine == "in-process":
        total = run_query_in_process(querier.request, server.verify_keys, sites, site_defaults,
                                     exclude_refusing=exclude_refusing)
    elif engine == "simulation":
        total = run_query_simulation(querier.request, server.verify_keys, sites, site_defaults,
                                     exclude_refusing=exclude_refusing, quiet=quiet)
    else:
        raise ValueError(f"engine {engine!r}: use simulation or in-process")
    return querier.release(total)


def run_centralized(cfg: RunConfig, progress: ProgressFn | None = None) -> dict:
    """Pooled training of the same backbone on all institutions' data (the baseline)."""
    t_start = time.time()
    data = prepare(cfg, progress=progress)
    pooled = data.load_pooled(cfg)
    pairsets = data.load_pairsets()
    backbone = initial_backbone(cfg)
    torch.manual_seed(cfg.seed + 1)
    head = build_head(cfg.head, cfg.embedding_size, pooled.num_classes)
    opt = make_optimizer(backbone, head, cfg.lr, cfg.momentum, cfg.weight_decay)
    recorder = RunRecorder(cfg.out, cfg.to_dict(), data.summary)
    va, vb, vsame = verification_pairs(pooled.y_val, max_pairs=1000, seed=cfg.seed)
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.time()
        lr = cosine_lr(cfg.lr, rnd - 1, cfg.rounds)
        for group in opt.param_groups:
            group["lr"] = lr
        res = train_epochs(backbone, head, pooled.x_train, pooled.y_train,
                           epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                           seed=cfg.seed * 7919 + rnd, optimizer=opt)
        record = {"round": rnd, "lr": lr, "train_loss": res.loss, "bytes_down": 0,
                  "bytes_up": 0}
        if len(vsame):
            val = verify_pairs(backbone, pooled.x_val, va, vb, vsame)
            record.update({"val_accuracy": val["accuracy"], "val_auc": val["auc"]})
        record.update(round_test_metrics(cfg, backbone, pairsets, rnd))
        record["seconds"] = round(time.time() - t0, 3)
        recorder.add_round(record)
        if progress is not None:
            progress("Centralized epochs", rnd * cfg.local_epochs, cfg.rounds * cfg.local_epochs)
    return finalize_run(cfg, backbone, pairsets, recorder, time.time() - t_start)


class MaskedFederation:
    """The masking protocol of an encrypted run without Flower: ``n`` institutions and
    the server, their code exactly as a run calls it (:mod:`client.masking`,
    :mod:`server.masking`), on real keys, shares and BFV ciphertexts. The benchmark
    (``fedface bench he``) times it at sizes a simulation cannot reach; the tests play
    the adversaries with it.

    Parameters
    ----------
    key_dir : str or Path
        A key ceremony folder with at least ``n`` institutions.
    n : int
        Institutions taking part.
    settings : MaskSettings or None
        Degree and threshold (default: the run defaults).
    run : str
        The run id.
    """

    def __init__(self, key_dir, n: int, settings=None, run: str = "masked-run") -> None:
        from flwr.app import Context, RecordDict

        from client import masking
        from crypto.keys import load_client_keys, load_server_keys
        from crypto.masks import MaskSettings, unpack_doc
        from server.masking import MaskCoordinator

        self.masking, self.unpack = masking, unpack_doc
        self.n, self.run = n, run
        self.keys = [load_client_keys(key_dir, k) for k in range(n)]
        self.server = load_server_keys(key_dir)
        self.ctx = [Context(run_id=1, node_id=k + 1, node_config={}, state=RecordDict(),
                            run_config={}) for k in range(n)]
        self.coord = MaskCoordinator(settings or MaskSettings(), run, self.server.verify_keys)
        self.t = self.keys[0].context.plain_modulus
        self.setup_bytes = [0] * n
        self.releases = [masking.Releases(c, None) for c in self.ctx]  # in memory
        self.settings = settings or MaskSettings()
        adverts = {}
        for k in range(n):
            rec = masking.run_advert(self.ctx[k], self.keys[k], run, self.releases[k])
            adverts[k] = unpack_doc(rec, "run key")
            self.setup_bytes[k] += len(rec["doc"])
        refused = self.coord.start(adverts)
        if refused:
            raise ValueError(f"run keys refused: {refused}")
        for k in range(n):
            down = self.coord.setup_doc(k)
            rec = masking.setup(self.ctx[k], self.keys[k], run, down, self.settings)
            self.setup_bytes[k] += len(rec["doc"]) + len(str(down))
            self.coord.take_epoch_advert(k, unpack_doc(rec, "epoch key"), self.coord.epoch)
        self.participants: list[int] = []
        self.round = 0

    def send(self, slots: dict, senders, server_round: int | None = None
             ) -> dict[int, list[bytes]]:
        """Participants in ``senders`` mask their packed ``slots`` (shape (k, n)) for round
        ``server_round`` (default: the next one), encrypt and send; the others drop
        before sending. An update's identity is a digest of its slots and round (the
        same update sent again is the same one). Returns the ciphertexts by sender and
        keeps per-sender seconds (``self.mask_seconds``) and bytes (``self.up_bytes``)."""
        import hashlib

        from crypto.masks import add_mod

        self.round = self.round + 1 if server_round is None else int(server_round)
        self.participants = self.coord.participants()
        cts, self.mask_seconds, self.up_bytes = {}, {}, {}
        for k in self.participants:
            if k not in senders:
                continue
            t0 = time.perf_counter()
            doc = self.coord.train_doc(k, self.participants)
            update = hashlib.sha256(f"{self.round}|".encode() + slots[k].tobytes()).hexdigest()
            mask, meta, rec = self.masking.mask_update(self.ctx[k], self.keys[k], self.run, doc,
                                                       slots[k].shape, self.t, self.round, update)
            cts[k] = self.keys[k].context.encrypt(add_mod(slots[k], mask, self.t))
            self.mask_seconds[k] = time.perf_counter() - t0
            self.up_bytes[k] = len(rec["doc"])
            self.coord.take_update(k, meta, self.unpack(rec, "shares"), self.participants)
        return cts

    def unmask(self, cts: dict[int, list[bytes]], answering=None) -> list[bytes]:
        """Announce the survivors (the senders), collect the shares of those
        ``answering`` (and their next keys), subtract the masks left: the encrypted sum.
        Raises :class:`server.masking.RoundAborted` when they cannot be removed."""
        survivors = sorted(cts)
        answering = survivors if answering is None else answering
        docs = self.coord.unmask_docs(survivors, self.participants)
        replies, self.unmask_bytes = {}, {}
        for k in answering:
            rec = self.masking.unmask(self.ctx[k], self.keys[k], self.run, docs[k],
                                      self.releases[k])
            replies[k] = self.unpack(rec, "shares")
            nxt = self.masking.advertise(self.ctx[k], self.keys[k], self.run, self.coord.epoch + 1)
            self.coord.take_epoch_advert(k, self.unpack(nxt, "epoch key"), self.coord.epoch + 1)
            self.unmask_bytes[k] = len(str(docs[k])) + len(rec["doc"]) + len(nxt["doc"])
        shape = (len(next(iter(cts.values()))), self.keys[0].context.params.slots)
        t0 = time.perf_counter()
        try:
            corr = self.coord.correction(replies, shape[0] * shape[1], self.t)
        finally:
            self.coord.next_epoch()
        ctx = self.server.context
        total = ctx.weighted_sum([cts[k] for k in survivors], [1] * len(survivors))
        total = ctx.subtract_plain(total, corr.reshape(shape))
        self.server_seconds = time.perf_counter() - t0
        return total

    def rekey(self, ks) -> None:
        """Institutions ``ks``, back after missing an exchange, advertise a key for the
        coming one (as at a catch-up)."""
        for k in ks:
            doc = self.masking.advertise(self.ctx[k], self.keys[k], self.run, self.coord.epoch)
            self.coord.take_epoch_advert(k, self.unpack(doc, "epoch key"), self.coord.epoch)
