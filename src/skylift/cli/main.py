"""The ``skylift`` command: one place where errors become one line and an exit code."""

from __future__ import annotations

import sys

import typer

# typer (>= 0.29, pinned in pyproject) bundles its own click; usage errors derive from this.
from typer._click.exceptions import ClickException

from skylift import __version__
from skylift.cli import agent, bundle, delta, hub, keys, remote
from skylift.cli.common import err
from skylift.errors import SkyliftError

__all__ = ["app", "main"]

app = typer.Typer(
    name="skylift",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Skylift: over-the-air updates for fleets of embedded Linux devices.",
)
app.add_typer(keys.app, name="keys")
app.add_typer(bundle.app, name="bundle")
app.add_typer(hub.app, name="hub")
app.command("login")(remote.login)
app.add_typer(remote.product_app, name="product")
app.add_typer(remote.release_app, name="release")
app.add_typer(remote.devices_app, name="devices")
app.add_typer(remote.deploy_app, name="deploy")
app.command("events")(remote.events)
app.command("audit")(remote.audit)
app.add_typer(remote.provisioning_app, name="provisioning")
app.add_typer(remote.signer_ca_app, name="signer-ca")
app.add_typer(agent.app, name="agent")
app.add_typer(delta.app, name="delta")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"skylift {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Skylift: over-the-air updates for fleets of embedded Linux devices."""


#: Exit codes: 1 for a refused or failed operation, 2 for bad usage (as click does).
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; print a SkyliftError as one line on stderr, never a traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except SkyliftError as e:
        err.print(f"[bold red]error:[/] {e.diagnostics()}", markup=True, highlight=False)
        return EXIT_FAILURE
    except OSError as e:  # disk full, permission denied, a path that vanished
        where = f": {e.filename}" if e.filename else ""
        err.print(f"[bold red]error:[/] {e.strerror or e}{where}", markup=True, highlight=False)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        err.print("aborted")
        return EXIT_FAILURE
    except ClickException as e:  # usage errors: bad option, unknown command
        e.show()
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
