"""A progress sink the stages report to; the CLI supplies one that draws a bar."""
from __future__ import annotations


class Progress:
    """No-op progress: start(total, label), update(n), close()."""

    def start(self, total: int, label: str) -> None:
        pass

    def update(self, n: int) -> None:
        pass

    def set(self, done: int) -> None:
        """Move to an absolute count (used when other processes do part of the work)."""
        pass

    def close(self) -> None:
        pass

    def log(self, message: str) -> None:
        pass
