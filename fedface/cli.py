"""The ``fedface`` command line: a thin layer over the library.

Commands: ``demo`` (the main job on the generated default set), ``train`` (federated or
centralized), ``eval`` (verification of a saved model on a pair file), ``keys`` (the
encryption key ceremony), ``bench`` (measurements that print JSON), ``models`` (what the
registries hold).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedface.config import RunConfig

app = typer.Typer(
    name="fedface", no_args_is_help=True, add_completion=False,
    help="Privacy-preserving federated learning for face recognition.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print JSON.")
app.add_typer(bench_app, name="bench")
keys_app = typer.Typer(no_args_is_help=True, help="Encryption keys: ceremony, fingerprints, "
                       "rotation.")
app.add_typer(keys_app, name="keys")
console = Console()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(2)


def _parse_sets(sets: list[str] | None) -> dict:
    out = {}
    for item in sets or []:
        if "=" not in item:
            _fail(f"--set {item!r}: use KEY=VALUE, e.g. --set val-fraction=0.2")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _config(**kwargs) -> RunConfig:
    sets = kwargs.pop("sets", None)
    values = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return RunConfig.from_run_config(values, **_parse_sets(sets))
    except ValueError as err:
        _fail(str(err))
    raise AssertionError  # unreachable


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def print_summary(doc: dict, title: str = "fedface run") -> None:
    """Readable tables of a metrics document: data, rounds, final verification."""
    cfg, data, final = doc["config"], doc.get("data", {}), doc.get("final", {})
    clients = data.get("clients", [])
    console.print(
        f"\n[bold]{title}[/]: {cfg['mode']}, backbone {cfg['backbone']} + {cfg['head']} head, "
        f"{cfg['image_size']}px, {cfg['rounds']} rounds x {cfg['local_epochs']} local epochs"
    )
    if clients:
        sizes = ", ".join(str(c["train_images"]) for c in clients)
        console.print(
            f"data: {data.get('source')} - {data.get('train_identities')} training identities, "
            f"{data.get('train_images')} images over {len(clients)} institutions "
            f"(images per institution: {sizes})"
        )
    rt = Table(title="Rounds", show_lines=False)
    for col in ("round", "loss", "val acc%", "test acc%", "excl", "sec", "MB down", "MB up"):
        rt.add_column(col, justify="right")
    for r in doc["rounds"]:
        rt.add_row(str(r["round"]), f"{r['train_loss']:.3f}" if r.get("train_loss") else "-",
                   _pct(r.get("val_accuracy")), _pct(r.get("test_accuracy")),
                   str(r.get("num_excluded", 0)), f"{r['seconds']:.1f}", f"{r['bytes_down'] / 1e6:.1f}",
                   f"{r['bytes_up'] / 1e6:.1f}")
    console.print(rt)
    ft = Table(title="Verification: 10-fold accuracy (threshold from the other folds), "
               "and the raw-pixel reference")
    for col in ("pairs", "n", "acc%", "AUC", "EER%", "TAR@1e-3%", "raw acc%", "gain"):
        ft.add_column(col, justify="right")
    for name, rep in final.items():
        if not isinstance(rep, dict) or "accuracy" not in rep:
            continue
        raw = rep.get("raw_pixels", {})
        gain = (rep["accuracy"] - raw["accuracy"]) * 100 if raw else None
        ft.add_row(name, str(rep["num_pairs"]), f"{_pct(rep['accuracy'])}±{_pct(rep['accuracy_std'])}",
                   f"{rep['auc']:.3f}", _pct(rep["eer"]), _pct(rep["tar_at_far_1e-3"]),
                   _pct(raw.get("accuracy")), "-" if gain is None else f"{gain:+.1f}")
    console.print(ft)
    print_privacy(doc)
    enc = doc.get("encryption")
    if enc:
        lay = enc["layout"]
        console.print(
            f"encrypted aggregation: BFV n={enc['params']['poly_modulus_degree']}, "
            f"{lay['bits']}-bit values (clip {lay['clip']}), {lay['digits']} per slot, "
            f"{enc['ciphertexts_per_update']} ciphertexts per update; key {enc['fingerprint']} "
            f"(generation {enc['generation']}); {enc['joined']} of {enc['nodes']} institutions "
            "joined; the server saw no update, only the released final model")
        for e in enc.get("join_excluded", []):
            console.print(f"  [yellow]not joined[/] node {e['node']}: {e['reason'][:200]}")
    if doc.get("stopped"):
        console.print(f"[yellow]stopped early:[/] {doc['stopped']}")
    console.print(f"wall time {final.get('wall_seconds', 0):.0f} s; model: {final.get('model')}")


def print_privacy(doc: dict) -> None:
    """Per-client epsilon spent (DP-SGD) and the central-DP epsilon, if the run had them."""
    rounds, plans = doc["rounds"], doc.get("dp_plans", {})
    if plans:
        spent: dict[str, float] = {}
        for r in rounds:
            spent.update(r.get("dp", {}).get("epsilon_spent", {}))
        cfg = doc["config"]
        unit = cfg.get("dp_unit", "image")
        protects = ("each person, all their images" if unit == "person" else "each image")
        t = Table(title=f"DP-SGD: epsilon spent per institution (budget {cfg['dp_epsilon']} over "
                  f"{cfg['dp_rounds'] or cfg['rounds']} rounds, {cfg['dp_accountant']} "
                  f"accountant; protects {protects})")
        for col in ("institution", "epsilon spent", "delta", "noise multiplier", "steps/round",
                    "people" if unit == "person" else "images"):
            t.add_column(col, justify="right")
        for cid, p in plans.items():
            t.add_row(cid, f"{spent[cid]:.3f}" if cid in spent else "-", f"{p['delta']:g}",
                      f"{p['noise_multiplier']:.3f}", str(p["steps_per_round"]),
                      str(p.get("units", "-")))
        console.print(t)
    central = [r["central_dp"] for r in rounds if "central_dp" in r]
    if central:
        c = central[-1]
        short = [r for r in central if r.get("aggregated", 0) < r.get("sampled", 0)]
        console.print(f"central DP ({c['mode']}): client-level epsilon {c['epsilon']:.3f} at "
                      f"delta {c['delta']:g}, noise multiplier {c['noise_multiplier']}, "
                      f"clip {c['clip']:.3g}" +
                      (f"; {len(short)} rounds aggregated fewer clients than sampled, accounted "
                       f"at their effective noise (all replying: epsilon "
                       f"{c['epsilon_if_all_replied']:.3f})" if short else ""))


def _run(cfg: RunConfig, verbose: bool, title: str, resume: bool = False) -> dict:
    from fedface.progress import RichProgress
    from fedface.runner import run

    try:
        with RichProgress(console) as progress:
            doc = run(cfg, progress=progress, quiet=not verbose, resume=resume)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        _fail(str(err))
    if doc.get("paused_after_round"):
        console.print(f"paused after round {doc['paused_after_round']}: continue with "
                      f"`fedface train --resume {cfg.out}`")
        return doc
    print_summary(doc, title)
    console.print(f"metrics: {Path(cfg.out) / 'metrics.json'}")
    return doc


DataOpt = Annotated[str, typer.Option(
    "--data", help="'synthetic' (generated default), or an identity folder "
    "(root/<identity>/*.jpg), an LFW tree or the ORL folder.")]
OutOpt = Annotated[str, typer.Option("--out", help="Output folder: metrics.json, model.pt.")]
PairsOpt = Annotated[list[str] | None, typer.Option(
    "--pairs", help="LFW-format pair file(s) for evaluation; repeatable.")]
PeopleOpt = Annotated[str | None, typer.Option(
    help="Identity list restricting training identities (e.g. peopleDevTrain.txt).")]
ImageSizeOpt = Annotated[int | None, typer.Option(help="Aligned chip size.")]
CacheOpt = Annotated[str | None, typer.Option(help="Cache folder.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Any other run setting as KEY=VALUE (see RunConfig), repeatable.")]
HeKeysOpt = Annotated[str | None, typer.Option(
    "--he-keys", help="Encrypted aggregation with the keys of `fedface keys init` in this "
    "folder: the server adds ciphertexts and never sees an update.")]
EpsilonOpt = Annotated[float | None, typer.Option(
    "--epsilon", help="DP-SGD on every client: the privacy budget epsilon each may spend "
    "over the run (delta min(1e-5, 1/10N); see --set dp-*).")]


@app.command()
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
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's log.")] = False,
) -> None:
    """Train a face model federatedly across simulated institutions (or centralized).

    Writes OUT/metrics.json (config, one record per round, final verification figures and
    the raw-pixel reference), OUT/model.pt and, every round, OUT/checkpoint.pt.
    Strategies: fedavg, fedavgm, fedadam, fedprox, pfm (partially federated momentum);
    --fv adds federated validation to any of them.
    """
    if resume:
        from fedface.runner import resume_config

        try:
            cfg = resume_config(resume, rounds=rounds)
        except (FileNotFoundError, ValueError) as err:
            _fail(str(err))
        _run(cfg, verbose, f"fedface train (resumed from {resume})", resume=True)
        return
    cfg = _config(data=data, pairs=",".join(pairs or []) or None, train_people=train_people,
                  mode=mode, num_clients=clients, rounds=rounds, local_epochs=local_epochs,
                  strategy=strategy, partition=partition, partition_alpha=alpha,
                  backbone=backbone, head=head, image_size=image_size, batch_size=batch_size,
                  lr=lr, seed=seed, flip_tta=flip or None, cache_dir=cache_dir, out=out,
                  fv=fv or None, dp_epsilon=epsilon, he_keys=he_keys, sets=sets)
    _run(cfg, verbose, f"fedface train ({cfg.mode})")


def demo_keys_dir(out: str | Path) -> Path:
    """Where ``demo --encrypted`` runs its key ceremony: ``OUT.keys``, a sibling of the
    run's output folder (which is meant to be shared), never inside it."""
    out = Path(out)
    return out.with_name(out.name + ".keys")


@app.command()
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
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's log.")] = False,
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
    cfg = _config(data=data, out=out, rounds=rounds, dp_epsilon=epsilon, batch_size=dp_batch,
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
    _run(cfg, verbose, "fedface demo")


@app.command()
def prepare(
    data: DataOpt = "synthetic",
    pairs: PairsOpt = None,
    train_people: PeopleOpt = None,
    clients: Annotated[int | None, typer.Option(help="Institutions to split into.")] = None,
    image_size: ImageSizeOpt = None,
    cache_dir: CacheOpt = None,
    sets: SetOpt = None,
) -> None:
    """Align faces (cached by content), split them across institutions, report problems.

    `fedface train` does this itself; run it alone to check a data folder first, or on a
    node to prepare its own data (--clients 1): the output names the files written.
    """
    from fedface.data.prepare import prepare as run_prepare
    from fedface.progress import RichProgress

    cfg = _config(data=data, pairs=",".join(pairs or []) or None, train_people=train_people,
                  num_clients=clients, image_size=image_size, cache_dir=cache_dir, sets=sets)
    try:
        with RichProgress(console) as progress:
            prepared = run_prepare(cfg, progress=progress)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    summ = prepared.summary
    t = Table(title=f"Prepared {summ['train_images']} images of {summ['train_identities']} identities")
    for col in ("institution", "train images", "identities", "val images", "val identities"):
        t.add_column(col, justify="right")
    for c in summ["clients"]:
        t.add_row(str(c["client"]), str(c["train_images"]), str(c["train_identities"]),
                  str(c["val_images"]), str(c["val_identities"]))
    console.print(t)
    counts = summ["report"]["counts"]
    console.print("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    for p in summ["report"]["problems"][:10]:
        console.print(f"  [yellow]{p['kind']}[/] {p['path']}"
                      + (f":{p['line']}" if p.get("line") else "") + f" - {p['reason']}")
    console.print(f"evaluation pair sets: {', '.join(summ['pair_sets'])}")
    console.print(f"files: {prepared.root}")


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Option(help="model.pt written by fedface train.")],
    images: Annotated[Path, typer.Option(help="Images root the pair file refers to.")],
    pairs: Annotated[Path, typer.Option(help="LFW-format pair file.")],
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    flip: Annotated[bool, typer.Option("--flip", help="Flip test-time augmentation.")] = False,
    cache_dir: CacheOpt = None,
) -> None:
    """Verification of a saved model on a pair file (10-fold accuracy, AUC, EER, TAR@FAR),
    with the raw-pixel reference and rank-1 identification among the pair images."""
    from fedface.evaluate import evaluate_model_on_pairs
    from fedface.progress import RichProgress

    try:
        with RichProgress(console) as progress:
            rep = evaluate_model_on_pairs(model, images, pairs, flip=flip,
                                          cache_dir=cache_dir, progress=progress)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    doc = {"config": {"mode": "eval", "backbone": rep["model"]["backbone"], "head": "-",
                      "image_size": rep["model"]["image_size"], "rounds": 0, "local_epochs": 0},
           "rounds": [], "final": {pairs.stem: rep["verification"]}}
    print_summary(doc, f"fedface eval {model}")
    console.print(f"rank-1 identification: {_pct(rep.get('rank1'))}% "
                  f"({rep.get('rank1_probes', 0)} probes)")
    if rep["report"]["problems"]:
        console.print(f"data problems: {rep['report']['counts']}")
    if json_path:
        from fedface.metrics import write_json

        write_json(json_path, rep)
        console.print(f"report: {json_path}")


@app.command()
def models() -> None:
    """List the registered backbones and heads."""
    from fedface.models import build_backbone, count_parameters, list_backbones, list_heads

    t = Table(title="Backbones (parameters at 112x112, 128-d)")
    t.add_column("name")
    t.add_column("parameters", justify="right")
    for name in list_backbones():
        t.add_row(name, f"{count_parameters(build_backbone(name)):,}")
    console.print(t)
    console.print("Heads: " + ", ".join(list_heads()))


def _keys_table(desc: dict, folder: str) -> Table:
    t = Table(title=f"Encryption keys in {folder}", show_header=False)
    p = desc["params"]
    for k, v in (("fingerprint", desc["fingerprint"]), ("generation", desc["generation"]),
                 ("scheme", f"{p['scheme'].upper()}, n={p['poly_modulus_degree']}, "
                  f"q {p['coeff_bits']} bits, t {p['plain_bits']} bits, 128-bit security"),
                 ("institutions", desc["clients"]), ("created", desc["created"])):
        t.add_row(k, str(v))
    return t


@keys_app.command("init")
def keys_init(
    out: Annotated[Path, typer.Option("--out", help="Folder for the key bundles.")],
    clients: Annotated[int, typer.Option(help="Institutions (one MAC key each).")] = 8,
    poly_modulus_degree: Annotated[int, typer.Option(help="BFV ring dimension.")] = 4096,
    plain_bits: Annotated[int, typer.Option(help="Plaintext modulus bits.")] = 40,
) -> None:
    """The key ceremony: a client bundle (with the secret key shared by the institutions)
    and a server bundle (no secret key), owner-only files, one fingerprint."""
    from crypto.context import HEParams
    from crypto.keys import KeyBundleError, init_keys

    try:
        desc = init_keys(out, clients, HEParams(poly_modulus_degree=poly_modulus_degree,
                                                plain_bits=plain_bits))
    except (KeyBundleError, ValueError) as err:
        _fail(str(err))
    console.print(_keys_table(desc, str(out)))
    from crypto.keys import handout

    console.print("Hand out each folder to its recipient only, over a private channel:")
    for who, folder in handout(out):
        console.print(f"  {who}: {folder}/", soft_wrap=True)
    console.print(f"Each institution's folder holds the shared secret key and only its own MAC "
                  f"key: the SuperNode of institution K runs with --node-config \"he-keys="
                  f"<its copy of {out}/institutions/client_K> he-sender=K\". The server's folder "
                  f"holds no secret key. Simulation (fedface train --he-keys {out}) reads both "
                  f"from {out}. {out}/key.json is the public description.", soft_wrap=True)


@keys_app.command("show")
def keys_show(folder: Annotated[Path, typer.Argument(help="Key folder or bundle folder.")]) -> None:
    """Fingerprint and parameters of a key folder (prints no secret)."""
    from crypto.keys import KeyBundleError, describe_keys

    try:
        desc = describe_keys(folder)
    except KeyBundleError as err:
        _fail(str(err))
    console.print(_keys_table(desc, str(folder)))


@keys_app.command("rotate")
def keys_rotate(folder: Annotated[Path, typer.Argument(help="Key folder of `keys init`.")]) -> None:
    """A new key generation (same parameters); the old one moves to retired/gen-G."""
    from crypto.keys import KeyBundleError, rotate_keys

    try:
        desc = rotate_keys(folder)
    except KeyBundleError as err:
        _fail(str(err))
    console.print(_keys_table(desc, str(folder)))
    console.print("envelopes under the old generation are now refused ('another key'): "
                  "redistribute the bundles before the next run")


@bench_app.command("he")
def bench_he(
    json_path: Annotated[Path, typer.Option("--json", help="Write results here.")],
    clients: Annotated[int, typer.Option(help="Clients per aggregate.")] = 8,
    synthetic_params: Annotated[int, typer.Option(help="Size of the synthetic update.")] =
        10_000_000,
    round_check: Annotated[bool, typer.Option(
        "--round/--no-round", help="Also time real federated rounds, plain vs encrypted.")] = True,
) -> None:
    """Encrypted vs plaintext aggregation side by side: seconds, bytes, error, round time."""
    from fedface.bench import bench_he as run_bench
    from fedface.metrics import write_json

    t0 = time.time()
    res = run_bench(clients=clients, synthetic_params=synthetic_params, round_check=round_check,
                    log=console.print)
    res["bench_seconds"] = round(time.time() - t0, 1)
    write_json(json_path, res)
    print(json.dumps(res, indent=2))


@bench_app.command("scale")
def bench_scale(
    json_path: Annotated[Path, typer.Option("--json", help="Write results here.")],
    clients: Annotated[str, typer.Option(help="Comma-separated client counts.")] = "10,50,100",
    sets: SetOpt = None,
) -> None:
    """One federated round with 10, 50 and 100 clients: seconds per round, peak memory."""
    from fedface.bench import bench_scale as run_bench
    from fedface.metrics import write_json

    counts = [int(c) for c in clients.split(",") if c.strip()]
    t0 = time.time()
    res = run_bench(counts, overrides=_parse_sets(sets), log=console.print)
    res["bench_seconds"] = round(time.time() - t0, 1)
    write_json(json_path, res)
    print(json.dumps(res, indent=2))


@bench_app.command("dp")
def bench_dp(
    json_path: Annotated[Path, typer.Option("--json", help="Write results here.")],
    backbones: Annotated[str, typer.Option(help="Comma-separated backbones.")] =
        "tinyface,mobilefacenet-dp",
    image_size: Annotated[int, typer.Option(help="Chip size.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 64,
    modes: Annotated[str, typer.Option(help="Comma-separated clipping modes (bk, hooks, "
                                              "ew, functorch).")] = "bk,hooks",
    repeats: Annotated[int, typer.Option(help="Alternating blocks per mode.")] = 3,
    threads: Annotated[str, typer.Option(help="Comma-separated torch thread counts (1: a "
                                                "simulated client's).")] = "1,2",
) -> None:
    """Time per local step, DP-SGD vs non-private, side by side: dp_step_ratio."""
    from fedface.bench import bench_dp as run_bench
    from fedface.metrics import write_json

    t0 = time.time()
    res = run_bench(tuple(b for b in backbones.split(",") if b), image_size=image_size,
                    batch_size=batch_size, modes=tuple(m for m in modes.split(",") if m),
                    threads=tuple(int(t) for t in threads.split(",") if t), repeats=repeats,
                    log=console.print)
    res["bench_seconds"] = round(time.time() - t0, 1)
    write_json(json_path, res)
    print(json.dumps(res, indent=2))


def main() -> None:
    # Worker threads of OpenMP sleep rather than spin when idle: on small shared machines
    # (2 cores, Ray actors beside the server) spinning threads cost up to 4x in speed.
    # Must be set before torch loads OpenMP; Ray's workers inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


if __name__ == "__main__":
    main()
