"""``fedface templates``: enrol, verify, identify, revoke, renew and list protected face
templates in a store (SQLite file or PostgreSQL URL).

A thin layer over :class:`fedface.templates.service.TemplateService`: the options pick the
store (``--db``), the scheme and its key (``--scheme``, ``--key``), the embedder
(``--embedder dlib`` or ``--model run/model.pt``) and the output (a table or ``--json``).
Keys are made with ``fedface keys token PATH`` (biohash, projection) and
``fedface keys match --out DIR`` (he).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fedface.cli.common import console
from fedface.errors import UserError

templates_app = typer.Typer(no_args_is_help=True, help="Protected face templates: enrol, "
                            "verify, identify, revoke, renew, list (no raw embedding is stored).")

DbOpt = Annotated[str, typer.Option(
    "--db", envvar="FEDFACE_TEMPLATES_DB", help="Store: a SQLite file path, or a URL such as "
    "postgresql+psycopg://user@host/db (env FEDFACE_TEMPLATES_DB).")]
SchemeOpt = Annotated[str, typer.Option(help="biohash, projection or he.")]
KeyOpt = Annotated[Path | None, typer.Option(
    "--key", help="Token file (biohash, projection: `fedface keys token`) or key folder (he: "
    "`fedface keys match`).")]
EmbedderOpt = Annotated[str, typer.Option(help="dlib (128-d matcher), unless --model is given.")]
ModelOpt = Annotated[Path | None, typer.Option(help="A fedface model.pt as the embedder.")]
PickOpt = Annotated[str, typer.Option(help="An image with several faces: refuse (one) or "
                                      "use the largest (largest).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ThresholdOpt = Annotated[float | None, typer.Option(
    help="Decision threshold on the score (default: FMR 0.1% on LFW for dlib).")]
FilesArg = Annotated[list[Path], typer.Argument(help="Images (one face each) or .npy embeddings.")]


class _Session:
    """The store, scheme and embedder of one command (closed on exit)."""

    def __init__(self, db: str, scheme: str, key: Path | None, embedder: str = "dlib",
                 model: Path | None = None, pick: str = "one", threshold: float | None = None,
                 bits: int = 0) -> None:
        from fedface.templates.embed import load_embedder
        from fedface.templates.schemes import load_scheme
        from fedface.templates.service import DEFAULT_THRESHOLDS, TemplateService
        from fedface.templates.store import open_store

        with _errors():
            if key is None:
                raise UserError(f"--key is needed for scheme {scheme}: make one with `fedface keys "
                                + ("match --out DIR`" if scheme == "he" else "token PATH`"))
            opts = {"bits": bits} if scheme == "biohash" and bits else {}
            self.scheme = load_scheme(scheme, key, **opts)
            self.embedder = load_embedder(model, embedder, pick)
            if threshold is None:
                threshold = DEFAULT_THRESHOLDS.get(self.embedder.name, {}).get(scheme)
                if threshold is None:
                    raise UserError(f"no calibrated threshold for {self.embedder.name} with "
                                    f"{scheme}: pass --threshold (measure one with `fedface bench "
                                    "templates --model ...`)")
            self.store = open_store(db)
            self.service = TemplateService(self.store, self.scheme, threshold)

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()

    def embed(self, files: list[Path], progress=None):
        with _errors():
            return self.embedder.embed_files(files, progress)


def _errors():
    """Library refusals (template, store, key) as the CLI's ``error:`` exit."""
    from crypto.keyfile import KeyFileError
    from fedface.errors import user_errors
    from fedface.templates.schemes import TemplateError
    from fedface.templates.store import StoreError

    return user_errors(TemplateError, StoreError, KeyFileError, ValueError, OSError)


def _emit(as_json: bool, doc, table: Table | None = None) -> None:
    if as_json:
        console.print_json(json.dumps(doc))
    elif table is not None:
        console.print(table)


@templates_app.command()
def enroll(
    files: Annotated[list[Path] | None, typer.Argument(
        help="Images or .npy embeddings of the subject (averaged into one template).")] = None,
    subject: Annotated[str | None, typer.Option(
        help="Pseudonymous subject id (a study code, never a name).")] = None,
    batch: Annotated[Path | None, typer.Option(
        help="Bulk enrolment: a folder of <subject>/<images or .npy> (one subject per folder).")] = None,
    db: DbOpt = "templates.db", scheme: SchemeOpt = "biohash", key: KeyOpt = None,
    embedder: EmbedderOpt = "dlib", model: ModelOpt = None, pick: PickOpt = "one",
    bits: Annotated[int, typer.Option(help="biohash: template bits (0 = 16 x dimension).")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Enrol a subject (--subject ID FILE...) or a folder of subjects (--batch DIR)."""
    from fedface.progress import RichProgress

    if (batch is None) == (subject is None):
        raise UserError("give --subject ID with FILE..., or --batch DIR (one folder per subject)")
    if subject is not None and not files:
        raise UserError(f"--subject {subject}: give at least one image or .npy file")
    with _Session(db, scheme, key, embedder, model, pick, 0.0, bits) as s:
        if batch is not None:
            if not batch.is_dir():
                raise UserError(f"--batch {batch} is not a folder of <subject>/<files>")
            folders = sorted(d for d in batch.iterdir() if d.is_dir())
            if not folders:
                raise UserError(f"--batch {batch} holds no subject folders")
            items = [(d.name, sorted(f for f in d.iterdir() if f.is_file())) for d in folders]
            recs, failed, good = [], [], []
            bar = RichProgress(console, transient=as_json)  # --json: stdout holds JSON only
            with bar as progress, _errors():
                for i, (sub, paths) in enumerate(items):
                    try:  # one bad subject does not stop the batch
                        good.append((sub, s.embed(paths)))
                    except UserError as err:
                        failed.append({"subject": sub, "error": str(err)})
                    progress("embed", i + 1, len(items))
                errors: list = []
                recs = s.service.enroll_many(good, lambda d, n: progress("enrol", d, n), errors)
                failed += [{"subject": sub, "error": msg} for sub, msg in errors]
        else:
            with _errors():
                recs, failed = [s.service.enroll(subject, s.embed(files))], []
    doc = {"enrolled": [{"subject": r.subject, "scheme": r.scheme, "key_id": r.key_id,
                         "bytes": len(r.template)} for r in recs], "failed": failed}
    t = Table(title=f"Enrolled ({scheme}, key {s.scheme.key_id})")
    for c in ("subject", "template bytes"):
        t.add_column(c)
    for r in recs:
        t.add_row(escape(r.subject), str(len(r.template)))
    _emit(as_json, doc, t)
    for f in failed if not as_json else []:
        console.print(f"[red]not enrolled[/] {escape(f['subject'])}: {escape(f['error'])}",
                      soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@templates_app.command()
def verify(
    files: FilesArg,
    subject: Annotated[str, typer.Option(help="The subject claimed.")],
    db: DbOpt = "templates.db", scheme: SchemeOpt = "biohash", key: KeyOpt = None,
    embedder: EmbedderOpt = "dlib", model: ModelOpt = None, pick: PickOpt = "one",
    threshold: ThresholdOpt = None, as_json: JsonOpt = False,
) -> None:
    """1:1: does the probe match the subject's template? Exit 0 on a match, 1 otherwise."""
    with _Session(db, scheme, key, embedder, model, pick, threshold) as s, _errors():
        m = s.service.verify(subject, s.embed(files))
    if as_json:
        _emit(True, m.to_dict())
    else:
        verdict = "[green]match[/]" if m.match else "[red]no match[/]"
        console.print(f"{escape(m.subject)}: {verdict} (score {m.score:.4f}, threshold "
                      f"{s.service.threshold})")
    if not m.match:
        raise typer.Exit(1)


@templates_app.command()
def identify(
    files: FilesArg,
    top: Annotated[int, typer.Option(help="Candidates to list.")] = 5,
    db: DbOpt = "templates.db", scheme: SchemeOpt = "biohash", key: KeyOpt = None,
    embedder: EmbedderOpt = "dlib", model: ModelOpt = None, pick: PickOpt = "one",
    threshold: ThresholdOpt = None, as_json: JsonOpt = False,
) -> None:
    """1:N: the best-scoring enrolled subjects for the probe."""
    with _Session(db, scheme, key, embedder, model, pick, threshold) as s, _errors():
        res = s.service.identify(s.embed(files), top)
    doc = {**res, "candidates": [c.to_dict() for c in res["candidates"]]}
    t = Table(title=f"Top {top} of {res['searched']} ({scheme})")
    for c in ("rank", "subject", "score", "match"):
        t.add_column(c)
    for i, c in enumerate(res["candidates"], 1):
        t.add_row(str(i), escape(c.subject), f"{c.score:.4f}", "yes" if c.match else "no")
    _emit(as_json, doc, t)
    if not as_json:
        for what, key in (("[red]integrity check failed, not matched:[/]", "tampered"),
                          ("[yellow]stored under other keys, not searched (if no one moved "
                           "them, their key id was edited):[/]", "other_keys"),
                          ("[yellow]missing from the encrypted gallery, not searched:[/]",
                           "not_indexed")):
            if res[key]:
                console.print(f"{what} {escape(', '.join(res[key]))}", soft_wrap=True)


@templates_app.command()
def revoke(
    subject: Annotated[str, typer.Option(help="The subject to revoke.")],
    db: DbOpt = "templates.db", scheme: SchemeOpt = "biohash", key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a subject's template (it is never matched again; enrol or renew to restore)."""
    with _Session(db, scheme, key, threshold=0.0) as s, _errors():
        r = s.service.revoke(subject)
    _emit(as_json, {"subject": r.subject, "status": r.status})
    if not as_json:
        console.print(f"{escape(r.subject)}: revoked ({scheme})")


@templates_app.command()
def renew(
    files: FilesArg,
    subject: Annotated[str, typer.Option(help="The subject to renew.")],
    db: DbOpt = "templates.db", scheme: SchemeOpt = "biohash",
    key: Annotated[Path | None, typer.Option("--key", help="The NEW token or key folder.")] = None,
    old_key: Annotated[Path | None, typer.Option(
        help="The token or key folder the subject is stored under now (needed to move it "
        "to a new key: the row is checked under it first).")] = None,
    embedder: EmbedderOpt = "dlib", model: ModelOpt = None, pick: PickOpt = "one",
    bits: Annotated[int, typer.Option(help="biohash: template bits (0 = 16 x dimension).")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Replace a subject's template by one made from fresh images, under --key (the same
    key, or a new one with --old-key)."""
    from fedface.templates.schemes import load_scheme

    with _Session(db, scheme, key, embedder, model, pick, 0.0, bits) as s, _errors():
        old = None
        if old_key is not None:
            old = load_scheme(scheme, old_key, **({"bits": bits} if scheme == "biohash" and bits
                                                  else {}))
        r = s.service.renew(subject, s.embed(files), old)
    _emit(as_json, {"subject": r.subject, "key_id": r.key_id, "version": r.version})
    if not as_json:
        console.print(f"{escape(r.subject)}: renewed under key {r.key_id}")


@templates_app.command("list")
def list_(
    db: DbOpt = "templates.db",
    scheme: Annotated[str | None, typer.Option(help="Only this scheme.")] = None,
    revoked: Annotated[bool, typer.Option("--all", help="Include revoked subjects.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Subjects in the store: scheme, key id, status, dates (no template is printed)."""
    from fedface.templates.store import open_store

    with _errors():
        store = open_store(db)
        try:
            rows = store.records(scheme, include_revoked=revoked)
            shown = store.url  # the password masked
        finally:
            store.close()
    doc = [{"subject": r.subject, "scheme": r.scheme, "key_id": r.key_id, "status": r.status,
            "created": r.created.isoformat(), "updated": r.updated.isoformat(),
            "bytes": len(r.template)} for r in rows]
    t = Table(title=escape(f"{len(rows)} templates in {shown}"))
    for c in ("subject", "scheme", "key id", "status", "updated", "bytes"):
        t.add_column(c)
    for d in doc:
        t.add_row(escape(d["subject"]), d["scheme"], d["key_id"], d["status"], d["updated"][:19],
                  str(d["bytes"]))
    _emit(as_json, doc, t)
