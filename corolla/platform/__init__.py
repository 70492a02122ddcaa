"""The `platform` command line, configuration and the local launchers."""

__all__: list[str] = []
