"""The embedded default: one table per simulated institution, generated here.

Each row is one face image an institution holds, with what a registry would keep about
it: the site, the person's sex and age, the image's acquisition quality (0..1) and how
many images the person has at that site. Sites differ in size, age mix and quality, so
that per-site group-bys and histograms show something. The federation's declared schema
(:func:`demo_schema`) lists the categories and ranges every site must respect.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from fedface.analytics.query import Schema

__all__ = ["demo_schema", "site_name", "write_demo_tables"]


def site_name(k: int) -> str:
    return f"site-{k}"


def demo_schema(sites: int) -> Schema:
    return Schema.from_dict({"columns": {
        "site": {"type": "categorical", "values": [site_name(k) for k in range(sites)]},
        "sex": {"type": "categorical", "values": ["f", "m"]},
        "age": {"type": "integer", "range": [18, 95]},
        "quality": {"type": "real", "range": [0, 1]},
        "images": {"type": "integer", "range": [1, 40]},
    }})


def write_demo_tables(folder: str | Path, sites: int, rows: int = 200, seed: int = 0
                      ) -> tuple[list[Path], Path]:
    """``site-K.csv`` for each site and ``schema.json`` in ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(sites):
        rng = np.random.default_rng([seed, k])
        n = int(rows * (0.6 + 0.8 * rng.random()))
        people = max(1, n // 8)
        person = rng.integers(0, people, n)
        sex = np.where(rng.random(people) < 0.45 + 0.1 * (k % 2), "f", "m")[person]
        age = np.clip(rng.normal(45 + 3 * (k % 5), 15, people), 18, 95).astype(int)[person]
        quality = np.clip(rng.beta(5 + k % 3, 2, n), 0, 1).round(4)
        images = np.bincount(person, minlength=people)[person]
        path = folder / f"{site_name(k)}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["site", "sex", "age", "quality", "images"])
            for i in range(n):
                w.writerow([site_name(k), sex[i], int(age[i]), float(quality[i]), int(images[i])])
        paths.append(path)
    schema = folder / "schema.json"
    schema.write_text(json.dumps(demo_schema(sites).to_dict(), indent=1))
    return paths, schema


def prepare_workdir(workdir: str | Path, sites: int, rows: int = 200, seed: int = 0) -> dict:
    """The demo federation in ``workdir``: ``tables/site-K.csv`` and ``tables/schema.json``,
    and a key ceremony for ``sites`` institutions in ``keys/`` (made once, remade when the
    number of sites changes). Returns the paths a query needs: ``table`` (with
    ``{partition}``), ``schema``, ``keys``, ``state_dir`` (with ``{partition}``)."""
    from crypto.keys import describe_keys, init_keys

    if sites < 2:
        raise ValueError(f"--sites {sites}: a federated query needs at least two sites")
    workdir = Path(workdir)
    tables = workdir / "tables"
    schema = tables / "schema.json"
    stamp = tables / "made.json"
    want = {"sites": sites, "rows": rows, "seed": seed}
    if not stamp.exists() or json.loads(stamp.read_text()) != want:
        write_demo_tables(tables, sites, rows, seed)
        stamp.write_text(json.dumps(want))
    keys = workdir / "keys"
    try:
        have = int(describe_keys(keys)["clients"])
    except Exception:  # noqa: BLE001 - no ceremony yet (or a broken one): make it
        have = -1
    if have != sites:
        init_keys(keys, sites, force=have != -1 or keys.exists())
    return {"table": str(tables / "site-{partition}.csv"), "schema": str(schema),
            "keys": str(keys), "state_dir": str(workdir / "state" / "site-{partition}")}
