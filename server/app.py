"""fedface ServerApp (Flower Message API).

``flwr run .`` loads ``app`` (settings from ``[tool.flwr.app.config]`` and ``-c``);
``fedface train`` builds its own with :func:`build_server_app` and runs it in the
simulation engine.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedface.config import RunConfig
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
        cfg = RunConfig.from_run_config(dict(context.run_config), **(overrides or {}))
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


def build_query_server_app(querier, verify_keys: dict, result: dict, *, sites: int = 0,
                           exclude_refusing: bool = False, wait: float = 60.0,
                           timeout: float = 120.0) -> ServerApp:
    """A ServerApp that runs one encrypted analytics query (:func:`server.analytics.run_query`)
    over every connected node and puts the :class:`~server.analytics.QueryResult` in
    ``result["result"]`` (or the exception in ``result["error"]``).

    Parameters
    ----------
    querier : server.analytics.Querier
        The query and its fresh key (made in the caller's process: the secret key stays there).
    verify_keys : dict
        The sites' public signing keys (the ceremony's server bundle).
    sites : int
        Nodes to wait for (up to ``wait`` seconds) before asking; 0: those connected.
    """
    import time

    from server.analytics import QueryFailed, flower_transport, run_query

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            deadline = time.monotonic() + wait
            nodes = sorted(grid.get_node_ids())
            while sites and len(nodes) < sites and time.monotonic() < deadline:
                time.sleep(0.5)
                nodes = sorted(grid.get_node_ids())
            if not nodes:
                raise QueryFailed("no site is connected: start the SuperNodes first")
            result["result"] = run_query(querier, verify_keys, flower_transport(grid, timeout),
                                         nodes, exclude_refusing=exclude_refusing)
        except Exception as err:
            result["error"] = err
            raise

    return app
