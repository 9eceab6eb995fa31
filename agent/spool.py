"""Results kept on disk until the server acknowledges them."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import cast

from agent.protocol import ResultMessage
from agent.storage import atomic_write_json, ensure_private_dir, read_json, remove_file

log = logging.getLogger(__name__)


class ResultSpool:
    """One JSON file per unacknowledged result, named after its kind and id.

    A result is stored before it is first sent and deleted when its ``ack`` arrives, so
    results survive disconnects and restarts and are sent again after each reconnect.
    """

    def __init__(self, directory: Path) -> None:
        """Use (and create) ``directory`` for the result files."""
        self.directory = ensure_private_dir(directory)

    def path_for(self, kind: str, ref: str) -> Path:
        """The file that holds the result of ``kind`` for id ``ref``."""
        digest = hashlib.sha256(ref.encode("utf-8")).hexdigest()[:40]
        return self.directory / f"{kind}-{digest}.json"

    def store(self, kind: str, ref: str, message: ResultMessage) -> None:
        """Write the result ``message`` atomically."""
        atomic_write_json(self.path_for(kind, ref), {"kind": kind, "ref": ref, "message": message})

    def get(self, kind: str, ref: str) -> ResultMessage | None:
        """The stored result of ``kind`` for ``ref``, if it is still unacknowledged."""
        entry = read_json(self.path_for(kind, ref))
        return _message_of(entry)

    def discard(self, kind: str, ref: str) -> bool:
        """Delete an acknowledged result; return whether it was stored."""
        return remove_file(self.path_for(kind, ref))

    def has(self, kind: str, ref: str) -> bool:
        """Whether a result of ``kind`` for ``ref`` is stored."""
        return self.path_for(kind, ref).exists()

    def pending(self, older_than: float = 0.0) -> list[ResultMessage]:
        """Stored results, oldest first; only those stored ``older_than`` seconds ago or more."""
        messages = []
        for path in self._files_oldest_first(time.time() - older_than):
            message = _message_of(read_json(path))
            if message is None:
                log.warning("Ignoring unreadable result file %s", path)
                continue
            messages.append(message)
        return messages

    def _files_oldest_first(self, stored_before: float) -> list[Path]:
        """Result files written before ``stored_before`` (epoch seconds), oldest first."""
        files = []
        for path in self.directory.glob("*.json"):
            try:
                modified = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if modified <= stored_before * 1e9:
                files.append((modified, path.name, path))
        return [path for _, _, path in sorted(files)]


def _message_of(entry: object) -> ResultMessage | None:
    """The message inside a stored entry, or ``None`` if the entry is malformed."""
    if not isinstance(entry, dict):
        return None
    message = entry.get("message")
    # Written by ResultSpool.store: a result envelope (sent again as it is).
    return cast("ResultMessage", message) if isinstance(message, dict) else None
