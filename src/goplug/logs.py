"""Loggers that cost nothing until they have something to say.

Importing :mod:`logging` takes longer than starting a small plugin's socket, so plugin-side
modules log through :class:`LazyLogger`. Debug and info records are only created once the
process has imported :mod:`logging` (nothing could show them before: configuring logging
imports it); warnings and errors import it themselves, so they are never lost.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import logging

__all__ = ["LazyLogger"]


class LazyLogger:
    """A stand-in for ``logging.getLogger(name)`` that imports :mod:`logging` on demand."""

    __slots__ = ("_logger", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: logging.Logger | None = None

    def _get(self) -> logging.Logger:
        if self._logger is None:
            import logging

            self._logger = logging.getLogger(self.name)
        return self._logger

    def debug(self, msg: str, *args: object) -> None:
        """Log at DEBUG level if logging is in use."""
        if "logging" in sys.modules:
            self._get().debug(msg, *args)

    def info(self, msg: str, *args: object) -> None:
        """Log at INFO level if logging is in use."""
        if "logging" in sys.modules:
            self._get().info(msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        """Log at WARNING level."""
        self._get().warning(msg, *args)

    def error(self, msg: str, *args: object) -> None:
        """Log at ERROR level."""
        self._get().error(msg, *args)

    def exception(self, msg: str, *args: object) -> None:
        """Log at ERROR level with the current exception's traceback."""
        self._get().exception(msg, *args)
