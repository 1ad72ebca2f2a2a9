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
