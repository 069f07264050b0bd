"""The `distillery` command line: a client of the REST API, plus `up` (the embedded stack) and `run` (local).

Heavy imports (torch, the engine, uvicorn) happen inside the commands that need them.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="distillery",
    help="Knowledge distillation as a service: run jobs locally or against a Distillery server.",
    no_args_is_help=True,
    add_completion=False,
)


def _register_commands() -> None:
    from distillery_cli import client, local, stack

    local.register(app)
    stack.register(app)
    client.register(app)


_register_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
