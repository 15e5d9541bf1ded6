"""The ``soft`` command line: thin Typer commands over the library."""
