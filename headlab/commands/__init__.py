"""The `headlab` command's subcommands, one module per group of commands. Each module holds plain functions
whose typed signatures are their command lines; `headlab.cli` registers them on the typer app and wraps each
in its one-line error handler. Heavy imports (torch, transformers, the store) happen inside the commands, so
`headlab --help` stays light."""
