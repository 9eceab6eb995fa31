"""Command-line entry point: load settings, set up logging, run until a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from agent import __version__
from agent.config import AgentConfig, ConfigError, load_config
from agent.logsetup import configure_logging
from agent.metrics import prime_cpu_usage
from agent.service import Agent
from agent.storage import StateError

log = logging.getLogger("agent")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent; return the process exit status."""
    try:
        config = load_config(argv, os.environ)
    except ConfigError as exc:
        print(f"sysmanage-agent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.log_level, secrets=[config.token])
    try:
        return asyncio.run(run(config))
    except StateError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE


async def run(config: AgentConfig) -> int:
    """Run the agent until SIGINT or SIGTERM."""
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _request_stop, stop, sig)
    prime_cpu_usage()
    log.info(
        "sysmanage-agent %s starting (server %s, state in %s)",
        __version__,
        config.websocket_url,
        config.state_dir,
    )
    await agent.run(stop)
    log.info("Stopped")
    return EXIT_OK


def _request_stop(stop: asyncio.Event, sig: signal.Signals) -> None:
    """Begin a clean shutdown."""
    if not stop.is_set():
        log.info("Received %s", sig.name)
        stop.set()
