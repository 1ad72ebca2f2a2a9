"""``fedface query``: statistics across institutions that only the querier can read.

A thin layer: the query is parsed by :mod:`fedface.analytics.query`, asked by a
:class:`server.analytics.Querier` (a fresh key per query) through Flower's simulation
engine (:func:`fedface.runner.run_query_simulation`) or with the sites in this process
(``--in-process``), and the answer printed as a table, as JSON, or drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedface.cli.common import VerboseOpt, console
from fedface.errors import UserError, user_errors


def read_query(text: str):
    """A query from its text, a JSON spec, or a ``.json`` file holding one."""
    from fedface.analytics.query import QuerySpec, parse

    if text.endswith(".json") and Path(text).is_file():
        text = Path(text).read_text()
    if text.lstrip().startswith("{"):
        try:
            return QuerySpec.from_dict(json.loads(text))
        except ValueError as err:
            raise UserError(f"the JSON query is not valid: {err}") from None
    return parse(text)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict) and "counts" in v:
        return " ".join("<" if c is None else str(c) for c in v["counts"])
    if isinstance(v, dict):
        return ", ".join(f"q{k}={_cell(x)}" for k, x in v.items())
    return str(v)


def print_result(doc: dict) -> None:
    rows = doc["rows"]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    eps = doc["epsilon"]
    title = (f"fedface query: {len(doc['sites'])} sites, "
             + (f"epsilon {eps:g} (delta {doc['delta']:g})" if eps else "exact sums")
             + (f", cells under {doc['min_cell']} blanked" if doc["min_cell"] else ""))
    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="left" if c in doc["spec"].get("group_by", []) else "right")
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in cols))
    console.print(table)
    for name in cols:
        edges = next((r[name]["edges"] for r in rows if isinstance(r.get(name), dict)
                      and "edges" in r[name]), None)
        if edges:
            console.print(f"{name} bins: " + " ".join(f"[{a:g},{b:g})" for a, b in
                                                       zip(edges, edges[1:])), markup=False)
    if doc["suppressed"]:
        console.print(f"{len(doc['suppressed'])} group(s) under {doc['min_cell']} rows not shown")
    for node, why in doc["excluded"].items():
        console.print(f"[yellow]excluded[/] node {node}: ", why, markup=True)
    if doc["dropped"]:
        console.print(f"dropped after masking (masks recovered): sites {doc['dropped']}")
    if doc["count_noise_std"]:
        console.print(f"DP noise on each count (and histogram bin): standard deviation "
                      f"{doc['count_noise_std']:.3g}")
    if doc["fixed_point_error"]:
        console.print(f"fixed-point error of sums of real columns: at most "
                      f"{doc['fixed_point_error']:.2g}")
    console.print(f"{doc['seconds']:.2f} s, {doc['bytes'] / 1e6:.2f} MB exchanged")


def emit(doc: dict, json_out: bool, plot: Path | None) -> None:
    """An answer as a table or JSON, and its histograms drawn when asked."""
    if json_out:
        print(json.dumps(doc, indent=1, default=str))
    else:
        print_result(doc)
    if plot is not None:
        from fedface.analytics.plot import plot_histograms

        with user_errors(ValueError):
            console.print(f"plot: {plot_histograms(doc, plot)}")


def query(
    text: Annotated[str, typer.Argument(help=(
        "The query, e.g. \"count, mean(quality) where age >= 60 group by site, sex\"; or a "
        "JSON spec (text or a .json file)."))],
    json_out: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Draw the histograms to this image.")] = None,
    sites: Annotated[int, typer.Option(help="Simulated institutions.")] = 5,
    tables: Annotated[str | None, typer.Option(help=(
        "Each site's table: a path with {partition} (site-{partition}.csv), or a folder of "
        "site-K.csv files. Default: the generated demo tables."))] = None,
    schema: Annotated[Path | None, typer.Option(help=(
        "The federation's declared schema (JSON): types, categories, ranges. Default: the "
        "demo's."))] = None,
    keys: Annotated[Path | None, typer.Option(help=(
        "Key-ceremony folder (`fedface keys init`): the sites' and the querier's signing "
        "keys. Default: the demo's."))] = None,
    workdir: Annotated[Path, typer.Option(help=(
        "Folder of the demo federation (tables, keys, the sites' state)."))] =
        Path("runs/analytics"),
    epsilon: Annotated[float, typer.Option(help=(
        "Differential privacy of the answer (Skellam noise added by the sites); 0: exact "
        "sums."))] = 0.0,
    delta: Annotated[float, typer.Option(help="Delta of the DP guarantee.")] = 1e-6,
    min_cell: Annotated[int, typer.Option(help=(
        "Blank groups and histogram bins with fewer rows (0: none)."))] = 5,
    exclude_refusing: Annotated[bool, typer.Option(help=(
        "Answer with the sites that accept the query (naming the others) instead of "
        "failing."))] = False,
    budget: Annotated[float, typer.Option(help=(
        "Simulated sites' privacy budget (epsilon, all queries together)."))] = 10.0,
    in_process: Annotated[bool, typer.Option(help=(
        "Run the sites in this process instead of Flower's simulation engine (same site "
        "code, no transport; seconds faster to start)."))] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Ask a statistics query across institutions: counts, sums, means, variances,
    histograms and quantiles, filtered and grouped. Each site masks and encrypts its own
    figures under a key made for this query; the server adds ciphertexts; only the sum is
    ever decrypted."""
    from fedface.analytics.demo import prepare_workdir
    from fedface.analytics.query import QueryError, load_schema
    from fedface.config.analytics import QueryConfig
    from fedface.runner import ask_query
    from server.analytics import QueryFailed

    with user_errors(ValueError, QueryError, FileNotFoundError):
        spec = read_query(text)
        cfg = QueryConfig(epsilon=epsilon, delta=delta, min_cell=min_cell,
                          exclude_refusing=exclude_refusing)
        if tables is None:
            paths = prepare_workdir(workdir, sites)
        else:
            if schema is None or keys is None:
                raise UserError("--tables needs --schema (the declared schema) and --keys "
                                "(the key ceremony's folder)")
            pattern = tables
            if Path(tables).is_dir():
                pattern = str(Path(tables) / "site-{partition}.csv")
            elif "{partition}" not in tables:
                raise UserError(f"--tables {tables}: give a folder of site-K.csv files or a "
                                "path with {partition}")
            paths = {"table": pattern, "schema": str(schema), "keys": str(keys),
                     "state_dir": str(workdir / "state" / "site-{partition}")}
        declared = load_schema(paths["schema"] if schema is None else schema)
    site_defaults = {**paths, "budget": budget, "exact": True}
    with user_errors(QueryFailed, QueryError, ValueError):
        result = ask_query(spec, declared, paths["keys"], sites, site_defaults,
                           engine="in-process" if in_process else "simulation", text=text,
                           exclude_refusing=cfg.exclude_refusing, quiet=not verbose,
                           **cfg.querier_settings())
    emit(result.to_dict(), json_out, plot)


def query_request(
    text: Annotated[str, typer.Argument(help="The query (text, or a JSON spec or file).")],
    schema: Annotated[Path, typer.Option(help="The federation's declared schema (JSON).")],
    keys: Annotated[Path, typer.Option(help=(
        "The key ceremony's folder, or a copy of its querier/ folder with key.json: the "
        "querier's signing key."))],
    out: Annotated[Path, typer.Option(help=(
        "Folder for request.json (public: give it to the coordinator) and "
        "querier-secret.key (keep it: it opens the answer)."))] = Path("runs/query-request"),
    epsilon: Annotated[float, typer.Option(help="DP epsilon of the answer (0: exact).")] = 0.0,
    delta: Annotated[float, typer.Option(help="Delta of the DP guarantee.")] = 1e-6,
    min_cell: Annotated[int, typer.Option(help="Blank cells with fewer rows.")] = 5,
    max_sites: Annotated[int, typer.Option(help="Most sites the answer can sum.")] = 1024,
) -> None:
    """Prepare a query for a deployment: a fresh key pair on this machine, the signed
    request for the coordinator (`flwr run . -c analytics-request=...`). The secret key
    stays here; open the answer with `fedface query-open`."""
    from crypto.keys import load_querier_key
    from fedface.analytics.query import QueryError, load_schema
    from fedface.config.analytics import QueryConfig
    from server.analytics import Querier, QueryFailed

    with user_errors(ValueError, QueryError, QueryFailed, OSError):
        cfg = QueryConfig(epsilon=epsilon, delta=delta, min_cell=min_cell, max_sites=max_sites)
        querier = Querier(read_query(text), load_schema(schema), load_querier_key(keys),
                          text=text, **cfg.querier_settings())
        path = querier.save(out)
    console.print(f"request: {path} (public; valid for an hour, for one run)")
    if cfg.epsilon == 0:
        console.print("[yellow]exact query[/]: deployed sites answer it only if their node "
                      "config says analytics-exact=true (else ask with --epsilon)")
    console.print(f"secret key: {out / 'querier-secret.key'} (keep it here; it opens the answer)")
    console.print("copy request.json to the coordinator; there, from the project folder "
                  "(absolute paths: Flower runs the app in a folder of its own):", soft_wrap=True)
    console.print("  FLWR_HOME=/ABS/coordinator/flwr flwr run . fedface --stream -c "
                  "\"analytics-request='/ABS/request.json' he-keys='/ABS/coordinator/he' "
                  "out='/ABS/query-out'\"", markup=False, soft_wrap=True)
    console.print(f"then here: fedface query-open {out} analytics-total.json (copied from "
                  "query-out/)", markup=False, soft_wrap=True)


def query_open(
    request: Annotated[Path, typer.Argument(help="The folder of `fedface query-request`.")],
    total: Annotated[Path, typer.Argument(help="The analytics-total.json the query job wrote.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Draw the histograms to this image.")] = None,
) -> None:
    """Decrypt a deployed query's total with the secret key kept here, and print it."""
    from server.analytics import EncryptedTotal, Querier, QueryFailed

    with user_errors(QueryFailed, ValueError, OSError):
        querier = Querier.load(request)
        if not total.is_file():
            raise UserError(f"{total} does not exist: copy the query job's "
                            "analytics-total.json here")
        result = querier.release(EncryptedTotal.from_json(total.read_text(), str(total)))
    emit(result.to_dict(), json_out, plot)
