"""``fedface eval`` (a saved model on a pair file) and ``fedface models`` (the registries)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedface.cli.common import CacheOpt, console, pct
from fedface.cli.summary import verification_table
from fedface.errors import user_errors


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
    from fedface.eval.saved_model import evaluate_model_on_pairs
    from fedface.progress import RichProgress

    with user_errors(FileNotFoundError, ValueError), RichProgress(console) as progress:
        rep = evaluate_model_on_pairs(model, images, pairs, flip=flip,
                                      cache_dir=cache_dir, progress=progress)
    meta = rep["model"]
    console.print(f"\n[bold]fedface eval {model}[/]: backbone {meta['backbone']}, "
                  f"{meta['image_size']}px")
    console.print(verification_table({pairs.stem: rep["verification"]}))
    console.print(f"rank-1 identification: {pct(rep.get('rank1'))}% "
                  f"({rep.get('rank1_probes', 0)} probes)")
    if rep["report"]["problems"]:
        console.print(f"data problems: {rep['report']['counts']}")
    if json_path:
        from fedface.metrics import write_json

        write_json(json_path, rep)
        console.print(f"report: {json_path}")


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
