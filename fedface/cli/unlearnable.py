"""``fedface unlearnable``: make an identity folder unlearnable (error-minimizing noise).

A thin layer over :func:`fedface.unlearnable.files.protect_tree`: the settings are a
:class:`~fedface.unlearnable.noise.NoiseConfig`, the result a manifest in the output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedface.cli.common import console
from fedface.errors import user_errors


def unlearnable(
    src: Annotated[Path, typer.Argument(help="Identity folders: IN/<person>/<image> (an LFW or "
                                             "ORL root works too). Never modified.")],
    dst: Annotated[Path, typer.Argument(help="Output folder, outside IN: the same tree as PNG, "
                                             "plus unlearnable.json.")],
    mode: Annotated[str, typer.Option(
        help="sample: one noise per image; class: one per person (needs two or more).")] =
        "sample",
    eps: Annotated[str, typer.Option(
        help="L-infinity budget as a fraction of the pixel range, e.g. 8/255 (at most "
        "32/255).")] = "8/255",
    surrogate: Annotated[str, typer.Option(
        help="Backbone the noise is made against (fedface models).")] = "tinyface",
    image_size: Annotated[int, typer.Option(help="Aligned chip side the noise is made at.")] = 64,
    max_iterations: Annotated[int, typer.Option(
        help="Outer min-min iterations at most (stop condition or this).")] = 30,
    seed: Annotated[int, typer.Option(help="Seeds the noise and the surrogate.")] = 0,
    cache_dir: Annotated[Path | None, typer.Option(
        help="Where the resumable state lives (default fedface's cache).")] = None,
) -> None:
    """Protect face images with error-minimizing noise (Huang et al., ICLR 2021): they look
    the same, but a recognizer trained on them learns the noise, not the people. Run the same
    command again to resume an interrupted run; measure what it holds against with
    `fedface bench unlearnable`."""
    from fedface.progress import RichProgress
    from fedface.unlearnable.files import protect_tree
    from fedface.unlearnable.noise import NoiseConfig, parse_eps

    with user_errors(ValueError):
        config = NoiseConfig(mode=mode, eps=parse_eps(eps), surrogate=surrogate,
                             image_size=image_size, max_iterations=max_iterations, seed=seed)
    with RichProgress(console) as progress, user_errors(ValueError, FileNotFoundError):
        doc = protect_tree(src, dst, config, cache_dir=cache_dir, progress=progress)
    table = Table(title=f"fedface unlearnable: {mode}-wise, eps {eps}", show_header=False)
    stop = doc["stop"]
    table.add_row("images protected", str(doc["images_protected"]))
    table.add_row("people", str(doc["identities"]))
    table.add_row("stop condition", f"{stop['condition']}: "
                  + ("reached" if stop["reached"] else "NOT reached")
                  + f" after {stop['iterations']} iterations "
                  f"(surrogate accuracy {stop['train_accuracy']:.3f})")
    table.add_row("max perturbation", f"{round(doc['max_perturbation'] * 255)}/255")
    table.add_row("seconds per image", f"{doc['seconds_per_image']:.3f}")
    table.add_row("skipped", str(len(doc["skipped"])))
    table.add_row("manifest", str(dst / "unlearnable.json"))
    console.print(table)
    for p in doc["skipped"]:
        console.print(f"[yellow]skipped[/] {p['path']}: {p['reason']}", soft_wrap=True)
    if not stop["reached"]:
        console.print("[yellow]The stop condition was not reached: the protection may be weak. "
                      "Raise --max-iterations and run again into a new folder.[/]")
