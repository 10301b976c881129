"""The `infdit` command line: a thin Typer shell over the library."""
