"""The user activity log."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


class UserActivity(models.Model):
    """One thing a user did (or tried to do), with where it came from."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="activities",
    )
    # Kept apart from ``user`` so that the record survives the account's deletion
    # and can name the account a failed login tried.
    username = models.CharField(max_length=150, db_index=True)
    action = models.CharField(max_length=50, db_index=True)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=500, blank=True)
    timestamp = models.DateTimeField(auto_now_add=True, db_index=True)
    details = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-timestamp"]
        verbose_name_plural = "user activities"

    def __str__(self) -> str:
        return f"{self.username} {self.action}"


class LoginCounter(models.Model):
    """Failed logins counted under one key, updated atomically before a password check.

    ``scope`` says what the key names: an account and the address it is tried from
    (``pair``, locked after ``LOGIN_LOCKOUT_THRESHOLD`` failures), an address whatever
    the account (``address``), or an account from anywhere (``account``, slowed down,
    never locked).  ``failures`` counts attempts in flight too: an attempt reserves its
    place before its password is checked and gives it back if the password was right.
    """

    scope = models.CharField(max_length=10)
    key = models.CharField(max_length=255)
    failures = models.PositiveIntegerField(default=0)
    window_started = models.DateTimeField()
    # pair and address: locked until then; account: no attempt from an unfamiliar
    # address is checked before then.
    blocked_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["scope", "key"], name="login_counter_scope_key")
        ]
        indexes = [models.Index(fields=["window_started"])]

    def __str__(self) -> str:
        return f"{self.scope} {self.key}: {self.failures}"
