"""``fedface bench``: measurements side by side, written as JSON and printed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from fedface.cli.common import SetOpt, console, parse_sets

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print JSON.")

JsonOpt = Annotated[Path, typer.Option("--json", help="Write results here.")]


def run_bench(json_path: Path, bench: Callable[[], dict]) -> None:
    """Every benchmark's ending: time it, write ``json_path``, print the JSON."""
    from fedface.bench import record_bench

    print(json.dumps(record_bench(bench, json_path), indent=2))


def run_bench_with_table(json_path: Path, bench: Callable[[], dict],
                         markdown: Callable[[dict], str]) -> None:
    """:func:`run_bench`, with the result's markdown table written beside the JSON."""
    from fedface.io import atomic_write_text

    def run() -> dict:
        res = bench()
        atomic_write_text(json_path.with_suffix(".md"), markdown(res))
        return res

    run_bench(json_path, run)


@bench_app.command("he")
def bench_he(
    json_path: JsonOpt,
    clients: Annotated[int, typer.Option(help="Clients per aggregate.")] = 8,
    synthetic_params: Annotated[int, typer.Option(help="Size of the synthetic update.")] =
        10_000_000,
    round_check: Annotated[bool, typer.Option(
        "--round/--no-round", help="Also time real federated rounds, plain vs encrypted "
        "vs masked.")] = True,
    mask_sizes: Annotated[str, typer.Option(
        help="Comma-separated federation sizes for the masking protocol.")] = "8,32,100",
) -> None:
    """Encrypted vs plaintext aggregation side by side: seconds, bytes, error, round
    time; and masked vs unmasked vs plaintext at several federation sizes."""
    from fedface import bench

    sizes = tuple(int(x) for x in mask_sizes.split(",") if x.strip())
    run_bench(json_path, lambda: bench.bench_he(
        clients=clients, synthetic_params=synthetic_params, round_check=round_check,
        log=console.print, mask_sizes=sizes))


@bench_app.command("scale")
def bench_scale(
    json_path: JsonOpt,
    clients: Annotated[str, typer.Option(help="Comma-separated client counts.")] = "10,50,100",
    sets: SetOpt = None,
) -> None:
    """One federated round with 10, 50 and 100 clients: seconds per round, peak memory."""
    from fedface import bench

    counts = [int(c) for c in clients.split(",") if c.strip()]
    overrides = parse_sets(sets)
    run_bench(json_path, lambda: bench.bench_scale(counts, overrides=overrides, log=console.print))


@bench_app.command("dp")
def bench_dp(
    json_path: JsonOpt,
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
    from fedface import bench

    run_bench(json_path, lambda: bench.bench_dp(
        tuple(b for b in backbones.split(",") if b), image_size=image_size,
        batch_size=batch_size, modes=tuple(m for m in modes.split(",") if m),
        threads=tuple(int(t) for t in threads.split(",") if t), repeats=repeats,
        log=console.print))


@bench_app.command("anonymize")
def bench_anonymize(
    json_path: JsonOpt,
    lfw: Annotated[Path, typer.Option(help="LFW root (pairs files inside).")] =
        Path("../shared/data/lfw"),
    faces_multi: Annotated[Path, typer.Option(help="faces-multi folder (labelled boxes).")] =
        Path("../shared/data/faces-multi"),
    pairs: Annotated[str, typer.Option(help="Pair file: pairsDevTest.txt, or pairs.txt (View 2).")] =
        "pairsDevTest.txt",
    methods: Annotated[str, typer.Option(help="Comma-separated methods.")] =
        "blur,mosaic,mask,dppix,ksame,cloak,scramble",
    presets: Annotated[str, typer.Option(help="Comma-separated presets.")] = "low,medium,high",
    surrogate: Annotated[str | None, typer.Option(
        help="The fedface model (model.pt) the cloak is computed against; cloak is skipped "
        "without one.")] = None,
    parts: Annotated[str, typer.Option(help="Which parts: reid, speed, detect, video, grid.")] =
        "reid,speed,detect,video,grid",
    update: Annotated[bool, typer.Option(
        "--update", help="Update the --json file: the parts and methods measured now replace "
        "theirs, the rest is kept.")] = False,
    video_frames: Annotated[int, typer.Option(help="Frames of each benchmark video.")] = 150,
    deface: Annotated[bool, typer.Option(
        "--deface/--no-deface", help="Run deface 1.5 on the same frames (installs it into a "
        "side environment once).")] = True,
    limit: Annotated[int | None, typer.Option(help="Use only this many pairs (quick look).")] = None,
) -> None:
    """Anonymizers measured: re-identification by dlib's matcher (naive and adaptive, FAR
    0.1%), detection rate, SSIM/PSNR, speed; detector recall/precision; video fps against
    deface; an image grid and a markdown table beside the JSON."""
    from fedface.anonymize import bench
    from fedface.errors import UserError

    for path, what in ((lfw / "pairsDevTest.txt", "LFW"), (faces_multi / "training.xml", "faces-multi")):
        if not path.exists():
            raise UserError(f"{what} not found ({path} is missing): pass --lfw / --faces-multi")

    previous = json.loads(json_path.read_text()) if update and json_path.exists() else None

    run_bench_with_table(json_path, lambda: bench.bench_anonymize(
        lfw, faces_multi, json_path.parent, pairs, methods.split(","), presets.split(","),
        surrogate, video_frames, deface, limit, tuple(parts.split(",")), previous,
        log=console.print), bench.markdown)


@bench_app.command("templates")
def bench_templates(
    json_path: JsonOpt,
    lfw: Annotated[Path, typer.Option(help="LFW root (pairs.txt inside).")] = Path("../shared/data/lfw"),
    model: Annotated[Path | None, typer.Option(
        help="A fedface model.pt as a second embedder (dlib's matcher is always measured).")] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Two folds, smaller samples, a 1,000-template encrypted gallery.")] = False,
) -> None:
    """Template protection on LFW View 2: EER and FNMR@FMR 0.1% protected vs unprotected
    (secret, per-person and stolen tokens), unlinkability D_sys with a bootstrap interval,
    the inversion attack, rank-1/5, bytes, enrolment rate, encrypted 1:1 and 1:N timings;
    a markdown table beside the JSON."""
    from fedface.errors import UserError
    from fedface.templates import bench

    if not (lfw / "pairs.txt").exists():
        raise UserError(f"LFW not found ({lfw / 'pairs.txt'} is missing): pass --lfw")
    if model is not None and not model.exists():
        raise UserError(f"--model {model} does not exist: train one with `fedface train --out DIR`")

    run_bench_with_table(json_path, lambda: bench.run(
        lfw, json_path.parent / "templates_work", model, quick, log=console.print),
        bench.markdown)


@bench_app.command("unlearnable")
def bench_unlearnable(
    json_path: JsonOpt,
    lfw: Annotated[Path, typer.Option(help="LFW root (pairsDevTest.txt inside).")] =
        Path("../shared/data/lfw"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="40 people, at most 20 images each, fewer iterations (a few minutes).")] = False,
    surrogate: Annotated[str, typer.Option(help="Backbone the noise is made against.")] =
        "tinyface",
    other: Annotated[str, typer.Option(help="A different backbone the adversary trains.")] =
        "mobilefacenet",
    image_size: Annotated[int, typer.Option(help="Chip side.")] = 48,
) -> None:
    """Unlearnable examples measured: top-1 of recognizers trained on protected vs clean
    images of the same LFW people (surrogate and another architecture), verification on
    pairsDevTest, every counter-measure as a row (grayscale, JPEG 10/50, augmentation,
    adversarial training, 20 % clean), seconds per image, perturbation, SSIM and PSNR; a
    markdown table beside the JSON."""
    from fedface.errors import UserError
    from fedface.unlearnable import bench

    if not (lfw / "lfw-deepfunneled").is_dir():
        raise UserError(f"LFW not found ({lfw / 'lfw-deepfunneled'} is missing): pass --lfw")
    run_bench_with_table(json_path, lambda: bench.bench_unlearnable(
        lfw, quick=quick, surrogate=surrogate, other=other, image_size=image_size,
        log=console.print), bench.markdown)


@bench_app.command("deploy")
def bench_deploy(
    json_path: JsonOpt,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Smaller data, 2 rounds, plaintext only (a few minutes).")] = False,
    encrypted: Annotated[bool, typer.Option(
        "--encrypted/--plaintext-only", help="Also the encrypted job, both ways.")] = True,
) -> None:
    """The same 3-site job deployed (a real SuperLink and SuperNodes on loopback, TLS and
    node authentication) and in simulation, in one run: seconds and bytes per round; a
    markdown table beside the JSON."""
    from fedface.deploy import bench

    app_dir = Path(__file__).resolve().parents[2]
    if not (app_dir / "pyproject.toml").exists():
        from fedface.errors import UserError

        raise UserError("fedface bench deploy submits this project with `flwr run .`: run it "
                        "from a source checkout (pyproject.toml beside fedface/)")

    run_bench_with_table(json_path, lambda: bench.run(
        json_path.parent / "deploy_work", app_dir, quick=quick, encrypted=encrypted,
        log=console.print), bench.markdown)


@bench_app.command("query")
def bench_query(
    json_path: JsonOpt,
    sizes: Annotated[str, typer.Option(help="Comma-separated numbers of sites.")] = "3,10,50",
    repeats: Annotated[int, typer.Option(help="Timed runs per size (median reported).")] = 5,
    flower_sites: Annotated[int, typer.Option(
        help="Sites of the extra run through Flower's simulation engine (0: none).")] = 3,
) -> None:
    """Encrypted analytics queries against the same query in plaintext, side by side:
    seconds, bytes and the ratio at each federation size, the answers checked equal; one
    DP row (10 sites, epsilon 1) and one run through Flower's simulation engine; a
    markdown table beside the JSON."""
    from fedface.analytics import bench
    from fedface.errors import UserError

    try:
        ns = tuple(int(x) for x in sizes.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--sizes {sizes!r}: give numbers of sites, e.g. 3,10,50") from None
    if not ns or min(ns) < 2 or repeats < 1:
        raise UserError("--sizes needs two or more sites each, --repeats at least 1")
    run_bench_with_table(json_path, lambda: bench.bench_query(
        ns, repeats=repeats, flower_sites=flower_sites, log=console.print), bench.markdown)
