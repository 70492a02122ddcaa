"""Corolla: run and fine-tune a large language model across a closed consortium."""

from corolla.errors import CorollaError

__all__ = ["CorollaError", "__version__"]

__version__ = "0.1.0"
