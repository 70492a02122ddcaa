"""One module per `platform` subcommand, each with `register(subparsers)`."""

__all__: list[str] = []
