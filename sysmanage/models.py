"""Core models: the user, with a UUID key as the WebSocket API's payloads carry."""

from __future__ import annotations

import uuid

from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    """A person who signs in to the dashboards, the REST API or the WebSocket API."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)

    class Meta(AbstractUser.Meta):
        swappable = "AUTH_USER_MODEL"
        permissions = [
            ("run_command", "Can run commands and package operations on hosts"),
        ]
