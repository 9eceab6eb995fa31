"""
``python bench/_querycount.py [daphne options] sysmanage.asgi:application``: the server as
``python -m sysmanage.serve`` starts it, counting the SQL statements it executes.

Every database connection the process opens gets an execute wrapper that counts its
statements by their first word (``SELECT``, ``INSERT``, ``UPDATE``, ``BEGIN``...;
``executemany`` counts once).  On ``SIGUSR1`` the counts are written, as JSON, to the
file named by ``BENCH_QUERY_COUNT_FILE`` (replaced whole), so a benchmark can read them
before and after a phase.  The wrapper costs a little CPU per statement: benchmarks time
the server without it and count with it in a separate pass.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from django.db.backends.signals import connection_created

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, for serve

_COUNTS: Counter[str] = Counter()
_LOCK = threading.Lock()


def _count(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]
) -> Any:
    verb = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else "?"
    with _LOCK:
        _COUNTS[verb] += 1
    return execute(sql, params, many, context)


def _wrap(sender: Any, connection: Any, **kwargs: Any) -> None:
    if _count not in connection.execute_wrappers:
        connection.execute_wrappers.append(_count)


def _dump(signum: int, frame: FrameType | None) -> None:
    path = Path(os.environ["BENCH_QUERY_COUNT_FILE"])
    with _LOCK:
        counts = dict(_COUNTS)
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps(counts))
    scratch.replace(path)


if __name__ == "__main__":
    connection_created.connect(_wrap)
    signal.signal(signal.SIGUSR1, _dump)
    from sysmanage.serve import main

    main()
