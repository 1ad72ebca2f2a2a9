"""``fedface keys``: the encryption key ceremony, fingerprints, a new key generation; scramble
keys, template tokens and the keys of encrypted template matching."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedface.cli.common import console
from fedface.errors import user_errors

keys_app = typer.Typer(no_args_is_help=True, help="Encryption keys: ceremony, fingerprints, "
                       "rotation; scramble keys; template tokens and matching keys.")


def keys_table(desc: dict, folder: str) -> Table:
    """The public description of a key folder (``key.json``): no secret in it."""
    from crypto.keys import signers

    t = Table(title=f"Encryption keys in {folder}", show_header=False)
    p = desc["params"]
    for k, v in (("fingerprint", desc["fingerprint"]), ("generation", desc["generation"]),
                 ("scheme", f"{p['scheme'].upper()}, n={p['poly_modulus_degree']}, "
                  f"q {p['coeff_bits']} bits, t {p['plain_bits']} bits, 128-bit security"),
                 ("institutions", desc["clients"]), ("created", desc["created"])):
        t.add_row(k, str(v))
    rows = signers(desc)
    for who, fp, private in rows:
        t.add_row(f"signing key, {who}", f"{fp} (private: {private}, {who} alone)")
    if not rows:
        t.add_row("signing keys", "none: former layout (MAC keys); run `fedface keys rotate`")
    return t


@keys_app.command("init")
def keys_init(
    out: Annotated[Path, typer.Option("--out", help="Folder for the key bundles.")],
    clients: Annotated[int, typer.Option(help="Institutions (one signing key pair each).")] = 8,
    poly_modulus_degree: Annotated[int, typer.Option(help="BFV ring dimension.")] = 4096,
    plain_bits: Annotated[int, typer.Option(help="Plaintext modulus bits.")] = 40,
) -> None:
    """The key ceremony: a bundle per institution (the secret key shared by the
    institutions, its own signing key) and a server bundle (no secret key, its own signing
    key), owner-only files, one fingerprint."""
    from crypto.context import HEParams
    from crypto.keys import handout, init_keys

    with user_errors(ValueError):  # KeyBundleError is one
        desc = init_keys(out, clients, HEParams(poly_modulus_degree=poly_modulus_degree,
                                                plain_bits=plain_bits))
    console.print(keys_table(desc, str(out)))
    console.print("Hand out each folder to its recipient only, over a private channel:")
    for who, folder in handout(out):
        console.print(f"  {who}: {folder}/", soft_wrap=True)
    console.print(f"Each institution's folder holds the shared secret key and only its own "
                  f"signing key (sign.key; every party holds every public key, so nobody, the "
                  f"server included, can sign in another's name): the SuperNode of institution "
                  f"K runs with --node-config \"he-keys="
                  f"<its copy of {out}/institutions/client_K> he-sender=K\". The server's folder "
                  f"holds no secret key. Simulation (fedface train --he-keys {out}) reads both "
                  f"from {out}. {out}/key.json is the public description.", soft_wrap=True)


@keys_app.command("show")
def keys_show(folder: Annotated[Path, typer.Argument(
        help="Key folder or bundle folder; a template token or scramble key file; a matching "
        "key folder.")]) -> None:
    """Fingerprint, parameters and signing-key fingerprints of a key folder, or the key id
    of a key file (prints no secret)."""
    from crypto.keyfile import KeyFileError
    from crypto.keys import KeyBundleError, describe_keys

    if folder.is_file():
        from crypto.scramble import key_id, load_key
        from crypto.tokens import load_token

        with user_errors(KeyFileError, OSError):
            with open(folder, "rb") as fh:
                first = fh.read(40)
            if first.startswith(b"fedface-scramble-key"):
                console.print(f"scramble key {folder}: key id {key_id(load_key(folder))}")
            else:
                console.print(f"template token {folder}: key id {load_token(folder).key_id}")
        return
    if (folder / "public").is_dir() or folder.name in ("public", "secret"):
        from crypto.match import load_match_keys

        with user_errors(KeyBundleError):
            keys = load_match_keys(folder / "public" if (folder / "public").is_dir() else folder)
        p = keys.params
        console.print(f"matching keys {folder}: key id {keys.key_id}, CKKS ring "
                      f"{p.poly_modulus_degree}, fold {p.fold}, "
                      f"{'key holder (secret key)' if keys.has_secret else 'public (no secret key)'}")
        return
    with user_errors(KeyBundleError):
        desc = describe_keys(folder)
    console.print(keys_table(desc, str(folder)))


@keys_app.command("rotate")
def keys_rotate(folder: Annotated[Path, typer.Argument(help="Key folder of `keys init`.")]) -> None:
    """A new key generation (same parameters, new signing key pairs); the old one moves to
    retired/gen-G."""
    from crypto.keys import KeyBundleError, rotate_keys

    with user_errors(KeyBundleError):
        desc = rotate_keys(folder)
    console.print(keys_table(desc, str(folder)))
    console.print("envelopes under the old generation are now refused ('another key'), and "
                  "every signing key is new: redistribute the folders before the next run",
                  soft_wrap=True)


@keys_app.command("scramble")
def keys_scramble(path: Annotated[Path, typer.Argument(help="The key file to create.")]) -> None:
    """A new key for `fedface anonymize --method scramble` (owner-only file; never
    overwrites one). Whoever holds it can restore every face scrambled with it."""
    from crypto.scramble import key_id, new_key

    with user_errors(ValueError, OSError):
        key = new_key(path)
    console.print(f"scramble key {key_id(key)} written to {path} (owner-only). Keep it apart "
                  "from the scrambled files: anyone with both sees the faces.", soft_wrap=True)


@keys_app.command("token")
def keys_token(path: Annotated[Path, typer.Argument(help="The token file to create.")]) -> None:
    """A new token for cancelable templates (`fedface templates --scheme biohash|projection`):
    owner-only, never overwrites one. A new token renews every template made with it."""
    from crypto.tokens import new_token

    with user_errors(ValueError, OSError):
        token = new_token(path)
    console.print(f"template token {token.key_id} written to {path} (owner-only). Keep it apart "
                  "from the template store: whoever holds both can invert the templates.",
                  soft_wrap=True)


@keys_app.command("match")
def keys_match(out: Annotated[Path, typer.Option("--out", help="Folder for the key pair.")]) -> None:
    """Keys of encrypted template matching (`fedface templates --scheme he`): OUT/public for
    the matching server and enrolment stations (no secret key), OUT/secret for the key
    holder who decrypts scores. Owner-only files; never overwrites keys."""
    from crypto.match import init_match_keys

    with user_errors(ValueError, OSError):
        desc = init_match_keys(out)
    console.print(f"matching keys {desc['key_id']} (CKKS, ring "
                  f"{desc['params']['poly_modulus_degree']}) written to {out}:", soft_wrap=True)
    console.print(f"  {desc['public']}/: the matching server and enrolment stations (no secret "
                  "key)", soft_wrap=True)
    console.print(f"  {desc['secret']}/: the key holder, who alone decrypts scores; keep it off "
                  "the server", soft_wrap=True)
