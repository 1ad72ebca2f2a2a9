"""What every command group shares: the console, the one ``error:`` exit path, the
options several commands take, and a ``RunConfig`` from options and ``--set``."""

from __future__ import annotations

from typing import Annotated

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from fedface.config import RunConfig
from fedface.errors import UserError, user_errors

console = Console()

USER_ERROR_EXIT = 2


def fail(message: str) -> None:
    """The one exit path for the user's mistakes: ``error: <message>``, exit code 2."""
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(USER_ERROR_EXIT)


class UserErrorGroup(TyperGroup):
    """The root command group: a :class:`~fedface.errors.UserError` raised by any command
    (nested groups included) leaves through :func:`fail`."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            fail(str(err))


def parse_sets(sets: list[str] | None) -> dict:
    """``--set KEY=VALUE`` options as ``{KEY: VALUE}`` (strings; RunConfig coerces)."""
    out = {}
    for item in sets or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: use KEY=VALUE, e.g. --set val-fraction=0.2")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def run_config(**options) -> RunConfig:
    """``RunConfig`` from the options given (``None``: not given) and ``sets``."""
    sets = options.pop("sets", None)
    values = {k: v for k, v in options.items() if v is not None}
    with user_errors(ValueError):
        return RunConfig.from_run_config(values, **parse_sets(sets))


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


DataOpt = Annotated[str, typer.Option(
    "--data", help="'synthetic' (generated default), or an identity folder "
    "(root/<identity>/*.jpg), an LFW tree or the ORL folder.")]
OutOpt = Annotated[str, typer.Option("--out", help="Output folder: metrics.json, model.pt.")]
PairsOpt = Annotated[list[str] | None, typer.Option(
    "--pairs", help="LFW-format pair file(s) for evaluation; repeatable.")]
PeopleOpt = Annotated[str | None, typer.Option(
    help="Identity list restricting training identities (e.g. peopleDevTrain.txt).")]
ImageSizeOpt = Annotated[int | None, typer.Option(help="Aligned chip size.")]
CacheOpt = Annotated[str | None, typer.Option(help="Cache folder.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Any other run setting as KEY=VALUE (see RunConfig), repeatable.")]
HeKeysOpt = Annotated[str | None, typer.Option(
    "--he-keys", help="Encrypted aggregation with the keys of `fedface keys init` in this "
    "folder: the server adds ciphertexts and never sees an update.")]
EpsilonOpt = Annotated[float | None, typer.Option(
    "--epsilon", help="DP-SGD on every client: the privacy budget epsilon each may spend "
    "over the run (delta min(1e-5, 1/10N); see --set dp-*).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Show Flower's log.")]


def joined_pairs(pairs: list[str] | None) -> str | None:
    """Repeated ``--pairs`` as RunConfig's comma-separated ``pairs`` (``None``: none given)."""
    return ",".join(pairs or []) or None
