"""Shared fixtures: users, tokens, a fresh hub per test, and event capture."""
from __future__ import annotations

import os

os.environ.setdefault("SYSMANAGE_ALLOW_UNSHARED_LAYER", "1")

import pytest  # noqa: E402
from channels.layers import channel_layers  # noqa: E402
from django.contrib.auth import get_user_model  # noqa: E402
from rest_framework_simplejwt.tokens import AccessToken  # noqa: E402

from sysmanage.hub import Hub  # noqa: E402

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _fresh_layer_and_hub():
    """Each test gets a new in-memory layer and starts its own hub on its own loop."""
    channel_layers.backends.clear()
    Hub._current = None
    yield
    Hub._current = None
    channel_layers.backends.clear()


@pytest.fixture
def make_user(db):
    """Create users: ``make_user("alice", staff=True)``."""

    def make(username: str = "operator", *, staff: bool = False, superuser: bool = False,
             active: bool = True):
        return get_user_model().objects.create_user(
            username=username, password=PASSWORD, is_staff=staff or superuser,
            is_superuser=superuser, is_active=active)

    return make


@pytest.fixture
def token_for():
    """An access JWT for a user."""

    def issue(user) -> str:
        return str(AccessToken.for_user(user))

    return issue
