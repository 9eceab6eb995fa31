"""The execution and operation ids the agent has accepted, so each runs at most once."""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

from agent.storage import atomic_write_json, read_json

log = logging.getLogger(__name__)

RUNNING = "running"
FINISHED = "finished"
DEFAULT_LIMIT = 1000

Key = tuple[str, str]


class IdLedger:
    """A bounded, persistent record of ``(kind, id)`` pairs and whether each has finished.

    ``kind`` is the result type (``command_result`` or ``package_result``).  The ledger
    keeps the most recent ``limit`` finished ids (running ones are never dropped) in a
    JSON file rewritten atomically on every change.
    """

    def __init__(self, path: Path, limit: int = DEFAULT_LIMIT) -> None:
        """Load the ledger from ``path`` if it exists."""
        self.path = path
        self.limit = limit
        self._entries: OrderedDict[Key, str] = OrderedDict()
        self._load()

    def state(self, kind: str, ref: str) -> str | None:
        """``RUNNING``, ``FINISHED`` or ``None`` if the id was never seen."""
        return self._entries.get((kind, ref))

    def mark_running(self, kind: str, ref: str) -> None:
        """Record that ``ref`` was accepted and is running (or waiting to run)."""
        self._set((kind, ref), RUNNING)

    def mark_finished(self, kind: str, ref: str) -> None:
        """Record that ``ref`` has a result."""
        self._set((kind, ref), FINISHED)

    def running(self) -> list[Key]:
        """Ids recorded as running (after a restart: ones the agent was stopped during)."""
        return [key for key, state in self._entries.items() if state == RUNNING]

    def __len__(self) -> int:
        """The number of ids remembered."""
        return len(self._entries)

    def _set(self, key: Key, state: str) -> None:
        """Record ``state`` for ``key`` as the newest entry, trim, and save."""
        self._entries.pop(key, None)
        self._entries[key] = state
        self._trim()
        atomic_write_json(
            self.path,
            {
                "version": 1,
                "entries": [[kind, ref, value] for (kind, ref), value in self._entries.items()],
            },
        )

    def _trim(self) -> None:
        """Drop the oldest finished ids beyond the limit."""
        excess = len(self._entries) - self.limit
        if excess <= 0:
            return
        for key in [key for key, state in self._entries.items() if state == FINISHED][:excess]:
            del self._entries[key]

    def _load(self) -> None:
        """Read the saved entries, skipping malformed ones."""
        saved = read_json(self.path)
        if saved is None:
            if self.path.exists():
                log.warning("Ignoring unreadable id ledger %s", self.path)
            return
        for entry in saved.get("entries", []) if isinstance(saved, dict) else []:
            if (
                isinstance(entry, list)
                and len(entry) == 3
                and all(isinstance(part, str) for part in entry)
                and entry[2] in (RUNNING, FINISHED)
            ):
                self._entries[(entry[0], entry[1])] = entry[2]
