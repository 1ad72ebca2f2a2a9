"""``fedface train`` and ``fedface demo``: a run, then its summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedface.cli.common import (
    CacheOpt,
    DataOpt,
    EpsilonOpt,
    HeKeysOpt,
    ImageSizeOpt,
    OutOpt,
    PairsOpt,
    PeopleOpt,
    SetOpt,
    VerboseOpt,
    console,
    joined_pairs,
    run_config,
)
from fedface.cli.summary import print_summary
from fedface.config import RunConfig
from fedface.errors import user_errors
from fedface.metrics import METRICS_FILE, RunDocument


def run_and_summarize(cfg: RunConfig, verbose: bool, title: str, resume: bool = False) -> dict:
    """Run ``cfg`` with a progress bar, then print its summary (or how to resume it)."""
    from fedface.progress import RichProgress
    from fedface.runner import run

    with user_errors(FileNotFoundError, ValueError, RuntimeError), RichProgress(console) as progress:
        doc = run(cfg, progress=progress, quiet=not verbose, resume=resume)
    paused = RunDocument(doc).paused_after_round
    if paused:
        console.print(f"paused after round {paused}: continue with "
                      f"`fedface train --resume {cfg.out}`")
        return doc
    print_summary(doc, title)
    console.print(f"metrics: {Path(cfg.out) / METRICS_FILE}")
    return doc


def train(
    data: DataOpt = "synthetic",
    pairs: PairsOpt = None,
    train_people: PeopleOpt = None,
    mode: Annotated[str, typer.Option(help="federated or centralized.")] = "federated",
    clients: Annotated[int | None, typer.Option(help="Simulated institutions.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round.")] = None,
    strategy: Annotated[str | None, typer.Option(
        help="fedavg | fedavgm | fedadam | fedprox | pfm.")] = None,
    partition: Annotated[str | None, typer.Option(
        help="dirichlet | powerlaw (identity-disjoint, skewed) | iid.")] = None,
    alpha: Annotated[float | None, typer.Option(help="Partition skew parameter.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone name (fedface models).")] = None,
    head: Annotated[str | None, typer.Option(help="cosface | arcface | softmax.")] = None,
    image_size: ImageSizeOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Local batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (cosine decay).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for split, init and training.")] = None,
    flip: Annotated[bool, typer.Option("--flip", help="Flip test-time augmentation.")] = False,
    cache_dir: CacheOpt = None,
    out: OutOpt = "runs/train",
    sets: SetOpt = None,
    epsilon: EpsilonOpt = None,
    he_keys: HeKeysOpt = None,
    fv: Annotated[bool, typer.Option("--fv", help="Federated validation of client weightings.")] = False,
    resume: Annotated[str | None, typer.Option(
        help="Continue the stopped run in this folder (its settings; --rounds may grow).")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train a face model federatedly across simulated institutions (or centralized).

    Writes OUT/metrics.json (config, one record per round, final verification figures and
    the raw-pixel reference), OUT/model.pt and, every round, OUT/checkpoint.pt.
    Strategies: fedavg, fedavgm, fedadam, fedprox, pfm (partially federated momentum);
    --fv adds federated validation to any of them.
    """
    if resume:
        from fedface.runner import resume_config

        with user_errors(FileNotFoundError, ValueError):
            cfg = resume_config(resume, rounds=rounds)
        run_and_summarize(cfg, verbose, f"fedface train (resumed from {resume})", resume=True)
        return
    cfg = run_config(data=data, pairs=joined_pairs(pairs), train_people=train_people,
                     mode=mode, num_clients=clients, rounds=rounds, local_epochs=local_epochs,
                     strategy=strategy, partition=partition, partition_alpha=alpha,
                     backbone=backbone, head=head, image_size=image_size, batch_size=batch_size,
                     lr=lr, seed=seed, flip_tta=flip or None, cache_dir=cache_dir, out=out,
                     fv=fv or None, dp_epsilon=epsilon, he_keys=he_keys, sets=sets)
    run_and_summarize(cfg, verbose, f"fedface train ({cfg.mode})")


def demo_keys_dir(out: str | Path) -> Path:
    """Where ``demo --encrypted`` runs its key ceremony: ``OUT.keys``, a sibling of the
    run's output folder (which is meant to be shared), never inside it."""
    out = Path(out)
    return out.with_name(out.name + ".keys")


def demo(
    data: DataOpt = "synthetic",
    out: OutOpt = "runs/demo",
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    epsilon: EpsilonOpt = None,
    encrypted: Annotated[bool, typer.Option(
        "--encrypted", help="Encrypted aggregation; keys from --he-keys, else a ceremony "
        "run into OUT.keys (next to OUT, never inside it).")] = False,
    he_keys: HeKeysOpt = None,
    sets: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """The main job: federated training across 8 simulated institutions, then evaluation.

    On the generated synthetic set by default (no real faces, nothing downloaded; about
    a minute on 2 CPU cores); --data PATH runs the same on an identity folder or LFW.
    --epsilon E trains every institution with DP-SGD under budget E (batch size 8, so that
    Poisson sampling also fits the smallest institution) and reports the epsilon spent.
    --encrypted aggregates homomorphically encrypted updates (BFV): the server never sees
    an update; the key ceremony runs into OUT.keys (owner-only, next to the shareable OUT,
    since it holds the secret key) unless --he-keys names a key folder.
    """
    dp_batch = 8 if epsilon and not any(s.startswith("batch-size") for s in sets or []) else None
    cfg = run_config(data=data, out=out, rounds=rounds, dp_epsilon=epsilon, batch_size=dp_batch,
                     sets=sets)
    if encrypted or he_keys:
        keys = he_keys or str(demo_keys_dir(cfg.out))
        if not he_keys and not (Path(keys) / "key.json").exists():
            from crypto.keys import init_keys

            desc = init_keys(keys, cfg.num_clients)
            console.print(f"key ceremony: {keys} (fingerprint {desc['fingerprint']}); it holds "
                          f"the institutions' secret key, owner-only, outside the run's output "
                          f"{cfg.out}", soft_wrap=True)
        cfg = cfg.replace(he_keys=keys)
    console.print("[bold]fedface demo[/]: " + (
        "generated synthetic faces (not real people)" if cfg.data == "synthetic" else cfg.data))
    run_and_summarize(cfg, verbose, "fedface demo")
