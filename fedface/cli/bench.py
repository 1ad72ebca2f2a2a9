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


@bench_app.command("he")
def bench_he(
    json_path: JsonOpt,
    clients: Annotated[int, typer.Option(help="Clients per aggregate.")] = 8,
    synthetic_params: Annotated[int, typer.Option(help="Size of the synthetic update.")] =
        10_000_000,
    round_check: Annotated[bool, typer.Option(
        "--round/--no-round", help="Also time real federated rounds, plain vs encrypted.")] = True,
) -> None:
    """Encrypted vs plaintext aggregation side by side: seconds, bytes, error, round time."""
    from fedface import bench

    run_bench(json_path, lambda: bench.bench_he(
        clients=clients, synthetic_params=synthetic_params, round_check=round_check,
        log=console.print))


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
