"""The root of Corolla's error hierarchy.

Each subpackage defines its own errors under `CorollaError`. The CLI maps every
`CorollaError` to its message and its `exit_code`; anything else is a bug.
"""


class CorollaError(Exception):
    """Base class of every error Corolla raises on purpose."""

    exit_code: int = 1
