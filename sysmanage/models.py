"""Core models: the user, with a UUID key as the WebSocket API's payloads carry, and the
refresh tokens spent by rotation that may still be presented again (the reuse grace)."""

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


class RefreshRotation(models.Model):
    """A refresh token spent by rotation, for the reuse grace (``sysmanage.credentials``).

    A client that sent a refresh and never saw the answer retries with the token it
    sent.  Until ``grace_until`` (``JWT_REFRESH_REUSE_GRACE_SECONDS`` after the rotation)
    that token gets a new pair of its sign-in -- as long as ``successor``, the latest
    refresh token issued for it, has not been spent in turn (rotated, logged out,
    revoked).  Only digests are kept: of the spent token, and of its sign-in (``sid``)
    so that logging out ends the grace of the whole sign-in.
    """

    #: SHA-256 (hex) of the spent refresh token
    spent = models.CharField(max_length=64, primary_key=True)
    successor = models.ForeignKey(
        "token_blacklist.OutstandingToken", on_delete=models.CASCADE, related_name="+"
    )
    #: SHA-256 (hex) of the token's sign-in (``sid`` claim); empty for tokens without one
    sign_in = models.CharField(max_length=64, db_index=True, blank=True)
    grace_until = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"refresh token {self.spent[:12]}… rotated, reusable until {self.grace_until}"
