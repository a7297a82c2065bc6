"""Entry point of the `evoclone` command."""

import typer

app = typer.Typer(no_args_is_help=True, help="EvoClone: federated, private patient digital twins.")
