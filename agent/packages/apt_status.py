"""Turning apt's ``APT::Status-Fd`` lines into overall progress."""

from __future__ import annotations

#: Line kinds apt writes on its status descriptor that carry progress.
_KINDS = ("dlstatus", "pmstatus", "pmerror", "pmconffile")


class AptProgress:
    """Maps download (``dlstatus``) and dpkg (``pmstatus``) percentages onto 0-100.

    Downloads take the first half and dpkg the second half when anything was
    downloaded; otherwise dpkg's percentage is used as is.  Progress never goes back.
    """

    def __init__(self) -> None:
        """Start at 0 % with nothing downloaded."""
        self.downloaded = False
        self.progress = 0.0

    def update(self, line: str) -> tuple[int, str] | None:
        """Account for one status line; return ``(progress, message)`` or ``None`` to skip."""
        kind, _, rest = line.strip().partition(":")
        parts = rest.split(":", 2)
        if kind not in _KINDS or len(parts) != 3:
            return None
        subject, percent_text, message = parts
        try:
            percent = min(max(float(percent_text), 0.0), 100.0)
        except ValueError:
            return None
        self.progress = max(self.progress, self._overall(kind, percent))
        if kind == "pmerror":
            message = f"error: {subject}: {message}"
        return int(self.progress), message.strip()

    def _overall(self, kind: str, percent: float) -> float:
        """The overall progress that ``percent`` of a ``kind`` line stands for."""
        if kind == "dlstatus":
            self.downloaded = True
            return percent / 2
        if kind == "pmstatus":
            return 50 + percent / 2 if self.downloaded else percent
        return self.progress


class LineSplitter:
    """Splits a byte stream into text lines, dropping any line longer than ``limit``."""

    def __init__(self, limit: int = 64 * 1024) -> None:
        """Start with an empty buffer."""
        self.limit = limit
        self._buffer = b""
        self._discarding = False

    def feed(self, chunk: bytes) -> list[str]:
        """Add ``chunk``; return the complete lines it finished."""
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        if lines and self._discarding:
            lines, self._discarding = lines[1:], False
        if len(self._buffer) > self.limit:
            self._buffer, self._discarding = b"", True
        return [line.decode("utf-8", "replace") for line in lines if len(line) <= self.limit]
