"""fedface ServerApp (Flower Message API).

``flwr run .`` loads ``app`` (settings from ``[tool.flwr.app.config]`` and ``-c``);
``fedface train`` builds its own with :func:`build_server_app` and runs it in the
simulation engine. With ``-c analytics-request=PATH`` the same app runs that encrypted
analytics query instead of training (:func:`run_query_job`); ``fedface query`` builds
:func:`build_query_server_app`.
"""

from __future__ import annotations

from logging import INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedface.config import QueryJobConfig, RunConfig, own_part
from fedface.progress import ProgressFn
from server.loop import run_federated


def build_server_app(overrides: dict | None = None, progress: ProgressFn | None = None,
                     result: dict | None = None, resume: bool = False) -> ServerApp:
    """A ServerApp running :func:`server.loop.run_federated`.

    Parameters
    ----------
    overrides : dict, optional
        Run-config entries that replace Flower's ``run_config``.
    progress : callable, optional
        ``progress(what, done, total)`` for data preparation and rounds.
    result : dict, optional
        Filled with the run's metrics document when the run ends, or with ``error``
        (the exception) when it fails.
    resume : bool
        Continue from the checkpoint in the run's output folder (so does the run config's
        ``resume``, which ``flwr run -c resume=true`` sets).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        flat = {**dict(context.run_config), **(overrides or {})}
        job = QueryJobConfig.from_run_config(own_part(QueryJobConfig, {
            k: v for k, v in flat.items() if k.replace("_", "-").startswith("analytics-")}))
        cfg = RunConfig.from_run_config(own_part(RunConfig, flat))
        if job.analytics_request:  # a query job (a deployment's `flwr run . -c ...`)
            try:
                path = run_query_job(grid, cfg, job)
            except Exception as err:
                if result is not None:
                    result["error"] = err
                raise
            if result is not None:
                result["total_path"] = str(path)
            return
        try:
            doc = run_federated(grid, cfg, progress=progress, resume=resume or cfg.resume)
        except Exception as err:
            if result is not None:  # hand the cause to the caller (the engine only logs it)
                result["error"] = err
            raise
        if result is not None:
            result.update(doc)

    return app


app = build_server_app()


def build_query_server_app(request, verify_keys: dict, result: dict, *, sites: int = 0,
                           exclude_refusing: bool = False, wait: float = 60.0,
                           timeout: float = 120.0) -> ServerApp:
    """A ServerApp that runs one encrypted analytics query (:func:`server.analytics.run_query`)
    over every connected node and puts the :class:`~server.analytics.EncryptedTotal` in
    ``result["total"]`` (or the exception in ``result["error"]``).

    Parameters
    ----------
    request : server.analytics.QueryRequest
        The signed query and the querier's public key (no secret: only the querier, who
        keeps its secret key, decrypts the total).
    verify_keys : dict
        The sites' public signing keys (the ceremony's server bundle).
    sites : int
        Nodes to wait for (up to ``wait`` seconds) before asking; 0: those connected.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            result["total"] = serve_query(grid, request, verify_keys, sites=sites, wait=wait,
                                          timeout=timeout, exclude_refusing=exclude_refusing)
        except Exception as err:
            result["error"] = err
            raise

    return app


def run_query_job(grid: Grid, cfg: RunConfig, job: QueryJobConfig):
    """The query job of a deployment: the request file (public), the server's keys
    (``he-keys``: the ceremony's server bundle, no secret), the query over the connected
    sites; the encrypted total written to ``OUT/analytics-total.json``. The querier, who
    kept the secret key on its own machine, opens it there (``fedface query-open``)."""
    from pathlib import Path

    from crypto.keys import load_server_keys
    from fedface.io import atomic_write_text
    from server.analytics import QueryFailed, QueryRequest

    path = Path(job.analytics_request)
    if not path.is_file():
        raise QueryFailed(f"analytics-request={path}: no such file on the coordinator; copy the "
                          "request.json of `fedface query-request` there")
    if not cfg.he_keys:
        raise QueryFailed("a query job needs he-keys: the key ceremony's server folder (it "
                          "holds the sites' public signing keys)")
    request = QueryRequest.from_json(path.read_text(), str(path))
    server = load_server_keys(cfg.he_keys)
    total = serve_query(grid, request, server.verify_keys, sites=job.analytics_sites,
                        exclude_refusing=job.analytics_exclude_refusing,
                        timeout=min(cfg.round_timeout, 600.0))
    out = Path(cfg.out) / TOTAL_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, total.to_json())
    log(INFO, "analytics query %s: sites %s in the sum, dropped %s, excluded %s; the encrypted "
        "total is in %s (the querier opens it with `fedface query-open`)", request.query_id,
        total.sites, total.dropped, total.excluded, out)
    return out


TOTAL_FILE = "analytics-total.json"


def serve_query(grid: Grid, request, verify_keys: dict, *, sites: int = 0, wait: float = 60.0,
                timeout: float = 120.0, exclude_refusing: bool = False):
    """Wait for ``sites`` nodes (up to ``wait`` s; 0: those connected) and run the query
    over them through the grid; the :class:`~server.analytics.EncryptedTotal`."""
    import time

    from server.analytics import QueryFailed, flower_transport, run_query

    deadline = time.monotonic() + wait
    nodes = sorted(grid.get_node_ids())
    while sites and len(nodes) < sites and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = sorted(grid.get_node_ids())
    if not nodes:
        raise QueryFailed("no site is connected: start the SuperNodes first")
    return run_query(request, verify_keys, flower_transport(grid, timeout), nodes,
                     exclude_refusing=exclude_refusing)
