"""The ``fedface`` application: composes the command groups and holds no command itself.

- ``train``, ``demo``: a run, then its summary (:mod:`fedface.cli.train`);
- ``prepare``: align, split and check a data folder (:mod:`fedface.cli.data`);
- ``eval``, ``models``: a saved model on a pair file, the registries (:mod:`fedface.cli.models`);
- ``bench``: measurements that print JSON (:mod:`fedface.cli.bench`);
- ``keys``: the encryption key ceremony, scramble keys, template tokens and matching
  keys (:mod:`fedface.cli.keys`);
- ``anonymize``: faces in images and videos (:mod:`fedface.cli.anonymize`);
- ``templates``: protected face templates in a store (:mod:`fedface.cli.templates`);
- ``deploy``: provision and run a deployment across hospitals (:mod:`fedface.cli.deploy`);
- ``unlearnable``: error-minimizing noise on an identity folder (:mod:`fedface.cli.unlearnable`);
- ``query``, ``query-request``, ``query-open``: encrypted statistics across institutions,
  simulated or deployed (:mod:`fedface.cli.analytics`);
- the tables of a run's summary: :mod:`fedface.cli.summary`; what the commands share
  (console, options, ``--set``): :mod:`fedface.cli.common`.

A :class:`fedface.errors.UserError` raised by any command ends as ``error: <message>``
with exit code 2 (:class:`fedface.cli.common.UserErrorGroup`).
"""

from __future__ import annotations

import os

import typer

from fedface.cli import (
    analytics,
    anonymize,
    bench,
    data,
    deploy,
    keys,
    models,
    templates,
    train,
    unlearnable,
)
from fedface.cli.common import UserErrorGroup

app = typer.Typer(
    name="fedface", cls=UserErrorGroup, no_args_is_help=True, add_completion=False,
    pretty_exceptions_show_locals=False,  # a crash must not print embeddings or keys
    help="Privacy-preserving federated learning for face recognition.",
)
app.add_typer(bench.bench_app, name="bench")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(templates.templates_app, name="templates")
app.add_typer(deploy.deploy_app, name="deploy")
app.command()(train.train)
app.command()(train.demo)
app.command()(data.prepare)
app.command("eval")(models.evaluate)
app.command()(models.models)
app.command()(anonymize.anonymize)
app.command()(unlearnable.unlearnable)
app.command()(analytics.query)
app.command("query-request")(analytics.query_request)
app.command("query-open")(analytics.query_open)


def main() -> None:
    """The ``fedface`` script (``python -m fedface.cli``)."""
    # Worker threads of OpenMP sleep rather than spin when idle: on small shared machines
    # (2 cores, Ray actors beside the server) spinning threads cost up to 4x in speed.
    # Must be set before torch loads OpenMP (no module of the CLI imports torch at import
    # time; the commands load it when they run); Ray's workers inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()
