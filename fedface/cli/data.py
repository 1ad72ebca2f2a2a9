"""``fedface prepare``: align, split and check a data folder; every problem listed."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from fedface.cli.common import (
    CacheOpt,
    DataOpt,
    ImageSizeOpt,
    PairsOpt,
    PeopleOpt,
    SetOpt,
    console,
    joined_pairs,
    run_config,
)
from fedface.errors import user_errors

PROBLEMS_SHOWN = 10


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

    cfg = run_config(data=data, pairs=joined_pairs(pairs), train_people=train_people,
                     num_clients=clients, image_size=image_size, cache_dir=cache_dir, sets=sets)
    with user_errors(FileNotFoundError, ValueError), RichProgress(console) as progress:
        prepared = run_prepare(cfg, progress=progress)
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
    for p in summ["report"]["problems"][:PROBLEMS_SHOWN]:
        console.print(f"  [yellow]{p['kind']}[/] {p['path']}"
                      + (f":{p['line']}" if p.get("line") else "") + f" - {p['reason']}")
    console.print(f"evaluation pair sets: {', '.join(summ['pair_sets'])}")
    console.print(f"files: {prepared.root}")
