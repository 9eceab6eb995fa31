"""Shared fixtures: users, tokens, a fresh hub per test, and event capture."""

from __future__ import annotations

import os

os.environ.setdefault("SYSMANAGE_ALLOW_UNSHARED_LAYER", "1")

import pytest
from channels.layers import channel_layers
from django.contrib.auth import get_user_model

from sysmanage.node import Node

PASSWORD = "correct horse battery staple"


#: The data migrations whose rows a freshly migrated database holds: the default alert
#: rules, and the functions that create them (``get_or_create``: safe to run again).
SEEDING_MIGRATIONS = (
    ("alerts.migrations.0004_default_rules", "create_rules"),
    ("alerts.migrations.0005_reboot_rule", "create_rule"),
    ("alerts.migrations.0006_cert_expiry_rule", "create_rule"),
)


@pytest.fixture(autouse=True)
def _rows_of_data_migrations(request, _django_db_marker):
    """A transactional test's flush empties what the data migrations put in the tables;
    a test after it on the same database gets those rows back, as every test finds them
    in a freshly migrated database, whatever ran before it (the suite may run in several
    processes, each in its own order)."""
    if request.node.get_closest_marker("django_db") is None:
        asked = [f for f in ("transactional_db", "db") if f in request.fixturenames]
        if not asked:
            return  # no database
        request.getfixturevalue(asked[0])  # set up now rather than after this
    import importlib

    from django.apps import apps

    from alerts.models import AlertRule

    if AlertRule.objects.exists():
        return
    for module, function in SEEDING_MIGRATIONS:
        getattr(importlib.import_module(module), function)(apps, None)


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """PBKDF2's deliberate slowness only slows the suite down."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _no_failed_handshakes_carried_over():
    """Failed socket authentications are counted per process; each test starts at none."""
    from sysmanage.admission import AUTH_FAILURES

    AUTH_FAILURES.clear()
    yield
    AUTH_FAILURES.clear()


def _wait_for_database_threads(timeout: float = 5.0) -> None:
    """Wait until the database threads finished what was queued (every thread meets at a
    barrier only once all are free), so that no query of a socket's work is still running
    when the test's database is flushed: on SQLite's shared in-memory database a running
    read locks the table the flush empties."""
    import threading

    from sysmanage import dbthreads

    if dbthreads._EXECUTOR is None:
        return
    count = dbthreads.thread_count()
    barrier = threading.Barrier(count)
    meetings = [dbthreads.executor().submit(barrier.wait, timeout) for _ in range(count)]
    for meeting in meetings:
        try:
            meeting.result(timeout)
        except Exception:  # a thread busy for longer: the flush says so if it matters
            barrier.abort()


@pytest.fixture(scope="session", autouse=True)
def _flush_after_database_threads():
    """Transactional tests flush the database after each test; first let the database
    threads finish (:func:`_wait_for_database_threads`)."""
    from django.test import TransactionTestCase

    original = TransactionTestCase._fixture_teardown
    original_setup = TransactionTestCase.__dict__["_pre_setup"]  # a classmethod

    def teardown(self):
        _wait_for_database_threads()
        return original(self)

    @classmethod
    def setup(cls):
        # and what a previous test's sockets left running as they closed
        _wait_for_database_threads()
        return original_setup.__func__(cls)

    TransactionTestCase._fixture_teardown = teardown
    TransactionTestCase._pre_setup = setup
    yield
    TransactionTestCase._fixture_teardown = original
    TransactionTestCase._pre_setup = original_setup


@pytest.fixture(autouse=True)
def _fresh_layer_and_hub():
    """Each test gets a new in-memory layer and starts its own node on its own loop."""
    channel_layers.backends.clear()
    Node._current = None
    yield
    Node._current = None
    channel_layers.backends.clear()


def grant(user, *perms: str) -> None:
    """Give ``user`` the model permissions ``"app_label.codename"``."""
    from django.contrib.auth.models import Permission

    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )


@pytest.fixture
def make_user(db):
    """Create users: ``make_user("alice", staff=True, perms=["alerts.change_alert"])``.

    Users who are not staff see every host unless ``every_host=False``."""

    def make(
        username: str = "operator",
        *,
        staff: bool = False,
        superuser: bool = False,
        active: bool = True,
        perms: tuple[str, ...] | list[str] = (),
        every_host: bool = True,
    ):
        """``every_host``: a user who is not staff sees every host (holds
        ``hosts.view_all_hosts``); False for one who sees only granted groups."""
        user = get_user_model().objects.create_user(
            username=username,
            password=PASSWORD,
            is_staff=staff or superuser,
            is_superuser=superuser,
            is_active=active,
        )
        if every_host and not (staff or superuser):
            # Written without the m2m signal: a new user has no socket to recheck, and a
            # recheck still reading when the test's database is flushed would lock it.
            from django.contrib.auth.models import Permission

            user.user_permissions.through.objects.create(
                user=user,
                permission=Permission.objects.get(
                    content_type__app_label="hosts", codename="view_all_hosts"
                ),
            )
        grant(user, *perms)
        return user

    return make


@pytest.fixture
def token_for():
    """An access JWT for a user."""

    def issue(user) -> str:
        from sysmanage.credentials import access_token_for

        return access_token_for(user)

    return issue


@pytest.fixture
def published(monkeypatch, django_capture_on_commit_callbacks):
    """Capture the layer messages that services publish (after commit), in order."""
    import sysmanage.node

    messages: list[dict] = []
    monkeypatch.setattr(sysmanage.node, "send_to_nodes", messages.append)

    class Capture:
        def __init__(self):
            self.messages = messages

        def run(self, fn, *args, **kwargs):
            """Call ``fn`` and run its on-commit callbacks; return its result."""
            with django_capture_on_commit_callbacks(execute=True):
                return fn(*args, **kwargs)

        def events(self, name=None):
            return [
                m
                for m in messages
                if m.get("type") == "hub.event" and (name is None or m["event"] == name)
            ]

    return Capture()
