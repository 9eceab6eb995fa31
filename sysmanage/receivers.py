"""
Close the sockets of users who lose access.

Django's admin saves users directly, so the model's signal is the one place that
sees every deactivation; the work itself is done by the service.
"""
from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.signals import user_logged_out
from django.db.models.signals import post_save, pre_delete
from django.dispatch import receiver

from sysmanage.services import session_sockets_close, user_sessions_revoke


@receiver(post_save, sender=get_user_model())
def close_sockets_of_deactivated_user(sender: Any, instance: Any, **kwargs: Any) -> None:
    """Called after a user is saved: a deactivated user's open sockets are closed."""
    if not instance.is_active:
        user_sessions_revoke(user_id=str(instance.pk), reason="User account is disabled")


@receiver(pre_delete, sender=get_user_model())
def close_sockets_of_deleted_user(sender: Any, instance: Any, **kwargs: Any) -> None:
    """Called before a user is deleted: its open sockets are closed."""
    user_sessions_revoke(user_id=str(instance.pk), reason="User account was deleted")


@receiver(user_logged_out)
def close_sockets_of_ended_session(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    """Called on session logout: the sockets that session opened are closed too."""
    session = getattr(request, "session", None)
    if session is not None and session.session_key:
        session_sockets_close(session_key=session.session_key, reason="Logged out")
