"""``skylift keys``: make release and role keys, export their public halves."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer

from skylift.cli.common import err, load_private, out, passphrase_for_new_key
from skylift.errors import UserInputError
from skylift.fsutil import atomic_write
from skylift.trust.keys import generate_private_key, private_key_pem, public_key_pem, tuf_key

app = typer.Typer(no_args_is_help=True, help="Make and export signing keys.")

_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@app.command()
def generate(
    name: Annotated[str, typer.Argument(help="Key name: writes NAME.key and NAME.pub.")],
    directory: Annotated[
        Path, typer.Option("--dir", "-d", help="Where to write the files.", file_okay=False)
    ] = Path("."),
    insecure_plaintext: Annotated[
        bool,
        typer.Option(
            "--insecure-plaintext",
            help="Store the private key unencrypted (only for throw-away test keys).",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
) -> None:
    """Generate an ed25519 key pair; the private key is encrypted with a passphrase.

    The passphrase comes from SKYLIFT_KEY_PASSPHRASE or is asked for twice.
    Prints the key id (the TUF key id of the public key).
    """
    if not _KEY_NAME.fullmatch(name):
        raise UserInputError(f"key name {name!r} is not allowed: use letters, digits, . _ -")
    private_path = directory / f"{name}.key"
    public_path = directory / f"{name}.pub"
    for p in (private_path, public_path):
        if p.exists() and not force:
            raise UserInputError(f"{p} exists", hint="choose another name or pass --force")
    passphrase = None if insecure_plaintext else passphrase_for_new_key()
    key = generate_private_key()
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(private_path, private_key_pem(key, passphrase), mode=0o600)
    atomic_write(public_path, public_key_pem(key.public_key()))
    keyid = tuf_key(key.public_key()).keyid
    if insecure_plaintext:
        err.print(f"warning: {private_path} is NOT encrypted")
    err.print(f"wrote {private_path} (private, mode 0600) and {public_path}")
    out.print(keyid)


@app.command("export-public")
def export_public(
    private_key: Annotated[Path, typer.Argument(help="The private key file (NAME.key).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="pem, or tuf (a TUF key document with its id).")
    ] = "pem",
) -> None:
    """Write the public key of a private key file, and print its key id to stderr."""
    if fmt not in ("pem", "tuf"):
        raise UserInputError(f"unknown format {fmt!r}; use pem or tuf")
    public = load_private(private_key).public_key()
    pub = tuf_key(public)
    if fmt == "pem":
        data = public_key_pem(public)
    else:
        data = (json.dumps({"keyid": pub.keyid, **pub.to_dict()}, indent=2) + "\n").encode()
    if output is None:
        typer.echo(data.decode(), nl=False)
    else:
        atomic_write(output, data)
        err.print(f"wrote {output}")
    err.print(f"key id: {pub.keyid}")
