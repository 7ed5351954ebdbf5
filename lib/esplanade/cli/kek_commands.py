"""`esplanade kek`: make a key-encryption key ring, and rotate what the store sealed."""

from __future__ import annotations

import asyncio
import base64
import secrets
from pathlib import Path
from typing import Annotated

import typer

kek_app = typer.Typer(help="Key-encryption keys that seal secrets in the store.", no_args_is_help=True)


@kek_app.command("generate")
def generate(
    key_id: Annotated[str, typer.Option(help="Identifier of the new key.")] = "",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the ring here (mode 0600).")] = None,
    add_to: Annotated[
        Path | None, typer.Option(help="Prepend a new active key to this existing ring file.", show_default=False)
    ] = None,
) -> None:
    """Print (or write) a KEK ring line `key-id:base64(32 random bytes)`."""
    kid = key_id or f"k{secrets.token_hex(4)}"
    line = f"{kid}:{base64.b64encode(secrets.token_bytes(32)).decode()}\n"
    if add_to is not None:
        text = line + add_to.read_text()
        add_to.write_text(text)
        add_to.chmod(0o600)
        typer.echo(f"added active key {kid} to {add_to}")
        return
    if output is None:
        typer.echo(line, nl=False)
        return
    output.write_text(line)
    output.chmod(0o600)
    typer.echo(f"wrote key {kid} to {output}")


@kek_app.command("rotate")
def rotate(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")] = None,
) -> None:
    """Re-seal every secret in the store under the active KEK (the first key of the ring)."""
    from esplanade.cli.main import settings_or_exit
    from esplanade.store.factory import load_keyring, open_store
    from esplanade.store.sealing import rotate_kek

    settings = settings_or_exit(config)

    async def run() -> None:
        keyring = load_keyring(settings.kek)
        async with open_store(settings.store) as store:
            report = await rotate_kek(store, keyring)
        typer.echo(str(report))

    asyncio.run(run())
