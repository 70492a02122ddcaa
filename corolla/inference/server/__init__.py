"""The block server behind `platform serve`."""

from corolla.inference.server.app import BlockServer, ServerConfig

__all__ = ["BlockServer", "ServerConfig"]
