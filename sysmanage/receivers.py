"""
Close the sockets and revoke the tokens of users who lose access.

Django's admin saves users directly, so the model's signals are the one place that sees
every change made through the ORM's ``save()`` and ``delete()``; the work itself is
done by the services.  Changes no signal sees (``QuerySet.update``) are caught by the
credential fingerprint of tokens and by each server's periodic recheck of its sockets.
"""
from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db.models.signals import post_save, pre_delete
from django.dispatch import receiver

from sysmanage.services import (
    refresh_tokens_revoke,
    session_sockets_close,
    user_credentials_sync,
    user_sessions_revoke,
)

#: Saves that change nothing about access (every login writes last_login).
_HARMLESS_FIELDS = frozenset({"last_login"})


@receiver(post_save, sender=get_user_model())
def close_sockets_of_deactivated_user(sender: Any, instance: Any, update_fields: Any = None,
                                      **kwargs: Any) -> None:
    """Called after a user is saved: a deactivated user's open sockets are closed, and
    refresh tokens issued for credentials it no longer has are revoked."""
    if update_fields is not None and set(update_fields) <= _HARMLESS_FIELDS:
        return
    user_credentials_sync(user=instance)
    if not instance.is_active:
        user_sessions_revoke(user_id=str(instance.pk), reason="User account is disabled")


@receiver(pre_delete, sender=get_user_model())
def close_sockets_of_deleted_user(sender: Any, instance: Any, **kwargs: Any) -> None:
    """Called before a user is deleted: its open sockets are closed and its refresh
    tokens revoked."""
    refresh_tokens_revoke(user_id=instance.pk)
    user_sessions_revoke(user_id=str(instance.pk), reason="User account was deleted")


@receiver(user_logged_out)
def close_sockets_of_ended_session(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    """Called on session logout: the sockets that session opened are closed too."""
    session = getattr(request, "session", None)
    if session is not None and session.session_key:
        session_sockets_close(session_key=session.session_key, reason="Logged out")
