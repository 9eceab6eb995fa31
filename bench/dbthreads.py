"""
Database threads: one thread (channels' ``database_sync_to_async``), a pool of N
(``sysmanage.dbthreads``) and Django's async ORM, running the database work of an agent
handshake for many connections at once, on PostgreSQL.

::

    .venv/bin/python bench/dbthreads.py --calls 4000 --concurrency 500

Each call is the shape of what an agent's connection asks of the database before it
is welcomed: the host of a token (``hosts.selectors.host_for_token``), then an update
of the host's row -- without the events and the transaction of the real
``host_agent_hello``, so that the async ORM can do the same (Django 5.2 has no async
transactions).  ``--latency MS`` adds a ``pg_sleep`` per call (sync modes), as a
database on another machine adds a network round trip.

Each mode runs in a process of its own on a fresh database (the same one for all
modes, re-seeded) and prints calls/s, the process's CPU per call and the peak number
of that process's connections busy at once (``pg_stat_activity``); then the machine's
report.  Loopback PostgreSQL only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MODES = ("single", "pool", "async-orm")


def child(args: argparse.Namespace) -> None:
    """One mode, in this process: print one JSON line of figures."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sysmanage.settings")
    sys.path.insert(0, str(REPO))
    import django

    django.setup()
    from channels.db import database_sync_to_async as single_thread
    from django.db import connection

    from hosts import selectors
    from hosts.models import Host
    from sysmanage import dbthreads
    from sysmanage.credentials import token_digest

    tokens = json.loads(Path(args.tokens_file).read_text())

    def work(token: str) -> None:
        if args.latency:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(%s)", [args.latency / 1000])
        host = selectors.host_for_token(token)
        assert host is not None
        Host.objects.filter(id=host.id).update(agent_session=secrets.token_hex(8))

    async def orm(token: str) -> None:
        if args.latency:
            await asyncio.sleep(0)  # no raw SQL in the async ORM: see the module's note
        host = await Host.objects.filter(token_hash=token_digest(token)).afirst()
        assert host is not None
        await Host.objects.filter(id=host.id).aupdate(agent_session=secrets.token_hex(8))

    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        import psycopg

        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            while not stop.is_set():
                (busy,) = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                    "AND state = 'active' AND pid <> pg_backend_pid()",
                    (args.database,),
                ).fetchone() or (0,)
                peak[0] = max(peak[0], int(busy))
                time.sleep(0.01)

    async def main() -> dict[str, Any]:
        if args.mode == "single":
            call = single_thread(work)
        elif args.mode == "pool":
            call = dbthreads.database_sync_to_async(work)
        else:
            call = orm
        gate = asyncio.Semaphore(args.concurrency)

        async def one(token: str) -> None:
            async with gate:
                await call(token)

        await asyncio.gather(*(one(t) for t in tokens[:50]))  # connections, imports
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        cpu0, t0 = time.process_time(), time.perf_counter()
        batch = (tokens * (args.calls // len(tokens) + 1))[: args.calls]
        await asyncio.gather(*(one(t) for t in batch))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stop.set()
        return {
            "mode": args.mode,
            "threads": dbthreads.thread_count() if args.mode == "pool" else 1,
            "calls_per_s": round(args.calls / elapsed, 1),
            "cpu_us_per_call": round(1e6 * cpu / args.calls, 1),
            "peak_busy_connections": peak[0],
        }

    print("RESULT " + json.dumps(asyncio.run(main())), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="Database threads benchmark.")
    parser.add_argument("role", nargs="?", choices=("run", "child"), default="run")
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--hosts", type=int, default=500)
    parser.add_argument("--threads", default="1,4,8", help="pool sizes to measure")
    parser.add_argument("--latency", type=float, default=0.0, help="ms of pg_sleep per call")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--mode", default="pool")
    parser.add_argument("--tokens-file", default="")
    parser.add_argument("--admin-url", default="")
    parser.add_argument("--database", default="")
    args = parser.parse_args()
    if args.role == "child":
        child(args)
        return 0
    sys.path.insert(0, str(REPO / "bench"))
    import psycopg
    from _common import MachineWindow
    from agents import prepare, server_env

    if "127.0.0.1" not in args.postgres_url:
        raise SystemExit("PostgreSQL must be on loopback")
    name = f"sysmanage_bench_dbthreads_{secrets.token_hex(5)}"
    with psycopg.connect(args.postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / name
    workdir.mkdir()
    env = server_env(workdir, None, 86400)
    env["DATABASE_URL"] = f"{args.postgres_url.rsplit('/', 1)[0]}/{name}"
    try:
        tokens = prepare(REPO, env, args.hosts)["tokens"]
        tokens_file = workdir / "tokens.json"
        tokens_file.write_text(json.dumps(tokens))
        runs: list[tuple[str, str]] = []
        for mode in args.modes.split(","):
            sizes = args.threads.split(",") if mode == "pool" else ["1"]
            runs += [(mode, size) for size in sizes]
        window = MachineWindow()
        for mode, size in runs:
            done = subprocess.run(
                [
                    PYTHON,
                    __file__,
                    "child",
                    "--mode",
                    mode,
                    "--calls",
                    str(args.calls),
                    "--concurrency",
                    str(args.concurrency),
                    "--latency",
                    str(args.latency),
                    "--tokens-file",
                    str(tokens_file),
                    "--admin-url",
                    args.postgres_url,
                    "--database",
                    name,
                ],
                cwd=REPO,
                env={**env, "DB_THREADS": size},
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(f"{mode} ({size}) failed:\n{done.stderr[-2000:]}")
                continue
            r = json.loads(lines[0][7:])
            print(
                f"{r['mode']:>9} threads {r['threads']}: {r['calls_per_s']:8.1f} calls/s, "
                f"{r['cpu_us_per_call']:7.1f} us CPU per call, peak busy connections "
                f"{r['peak_busy_connections']}",
                flush=True,
            )
        print(window.report())
    finally:
        with (
            contextlib.suppress(Exception),
            psycopg.connect(args.postgres_url, autocommit=True) as admin,
        ):
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
