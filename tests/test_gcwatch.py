"""The collector settled after start-up, and its pauses timed (``sysmanage.gcwatch``)."""

from __future__ import annotations

import gc
import logging

import pytest

from sysmanage import gcwatch


@pytest.fixture
def restore_gc():
    """Put the collector back as it was: settle() changes the whole process."""
    thresholds = gc.get_threshold()
    callbacks = list(gc.callbacks)
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    gc.callbacks[:] = callbacks


def test_settle_freezes_what_start_up_made_and_raises_the_thresholds(restore_gc):
    """Objects alive at start-up are out of every later collection's sight, and the
    young generations are collected far less often than CPython's 700/10/10."""
    gcwatch.settle(tune=True)
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (
        gcwatch.THRESHOLD_YOUNG,
        gcwatch.THRESHOLD_MIDDLE,
        gcwatch.THRESHOLD_OLD,
    )


def test_settle_can_leave_the_collector_alone(restore_gc):
    """GC_TUNE=0 (tune=False) only watches."""
    before = gc.get_threshold()
    watch = gcwatch.settle(tune=False)
    assert gc.get_threshold() == before
    assert watch in gc.callbacks


def test_every_collection_is_timed_and_long_ones_logged(restore_gc, caplog):
    """A collection at least as long as the limit is a warning naming its generation
    and its pause; shorter ones are only counted."""
    watch = gcwatch.settle(log_over_ms=0.0, tune=False)
    with caplog.at_level(logging.WARNING, logger="sysmanage.gc"):
        gc.collect()
    assert watch.count[2] >= 1
    assert watch.longest[2] > 0.0
    assert "garbage collection of generation 2 paused the process for" in caplog.text

    quiet = gcwatch.PauseWatch(log_over_ms=1e9)
    caplog.clear()
    quiet("start", {"generation": 0})
    quiet("stop", {"generation": 0, "collected": 0})
    assert quiet.count == [1, 0, 0]
    assert caplog.text == ""
