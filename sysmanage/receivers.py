"""
Close the sockets and revoke the tokens of users who lose access.

Django's admin saves users directly, so the model's signals are the one place that sees
every change made through the ORM's ``save()`` and ``delete()``; the work itself is
done by the services.  Changes no signal sees (``QuerySet.update``) are caught by the
credential fingerprint of tokens and by each server's periodic recheck of its sockets.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.contrib.auth.signals import user_logged_out
from django.db.models import Model
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete
from django.dispatch import receiver
from django.http import HttpRequest

from sysmanage.services import (
    refresh_tokens_revoke,
    session_sockets_close,
    user_access_recheck,
    user_credentials_sync,
    user_sessions_revoke,
)

if TYPE_CHECKING:
    from sysmanage.models import User

UserModel = get_user_model()

#: Saves that change nothing about access (every login writes last_login).
_HARMLESS_FIELDS = frozenset({"last_login"})


@receiver(post_save, sender=UserModel)
def recheck_saved_user(
    sender: type[User],
    instance: User,
    created: bool = False,
    update_fields: Iterable[str] | None = None,
    **kwargs: object,
) -> None:
    """Called after a user is saved: a deactivated user's open sockets are closed,
    refresh tokens issued for credentials it no longer has are revoked, and its other
    sockets are rechecked (a new password, lost staff or superuser status)."""
    if created or (update_fields is not None and set(update_fields) <= _HARMLESS_FIELDS):
        return
    user_credentials_sync(user=instance)
    if not instance.is_active:
        user_sessions_revoke(user_id=str(instance.pk), reason="User account is disabled")
    else:
        user_access_recheck(user_ids=[str(instance.pk)])


def _changed_users(
    instance: Model, reverse: bool, pk_set: Iterable[object] | None
) -> list[str] | None:
    """The users an m2m change touched; None when it cannot say (a reverse clear)."""
    if not reverse:
        return [str(instance.pk)]
    return None if pk_set is None else [str(pk) for pk in pk_set]


@receiver(m2m_changed, sender=UserModel.user_permissions.through)
@receiver(m2m_changed, sender=UserModel.groups.through)
def recheck_users_of_changed_rights(
    sender: type[Model],
    instance: Model,
    action: str,
    reverse: bool,
    pk_set: Iterable[object] | None = None,
    **kwargs: object,
) -> None:
    """Called when users' permissions or groups change (either side of the relation)."""
    if action in ("post_add", "post_remove", "post_clear"):
        user_access_recheck(user_ids=_changed_users(instance, reverse, pk_set))


@receiver(m2m_changed, sender=Group.permissions.through)
def recheck_all_after_group_permissions(sender: type[Model], action: str, **kwargs: object) -> None:
    """Called when a group's permissions change: its members may have lost a right."""
    if action in ("post_add", "post_remove", "post_clear"):
        user_access_recheck(user_ids=None)


@receiver(post_delete, sender=Group)
@receiver(post_delete, sender=Permission)
def recheck_all_after_deleted_rights(sender: type[Model], **kwargs: object) -> None:
    """Called when a group or a permission is deleted: its holders lost a right."""
    user_access_recheck(user_ids=None)


@receiver(pre_delete, sender=UserModel)
def close_sockets_of_deleted_user(sender: type[User], instance: User, **kwargs: object) -> None:
    """Called before a user is deleted: its open sockets are closed and its refresh
    tokens revoked."""
    refresh_tokens_revoke(user_id=instance.pk)
    user_sessions_revoke(user_id=str(instance.pk), reason="User account was deleted")


@receiver(user_logged_out)
def close_sockets_of_ended_session(
    sender: type[User], request: HttpRequest | None, user: User | None, **kwargs: object
) -> None:
    """Called on session logout: the sockets that session opened are closed too."""
    session = getattr(request, "session", None)
    if session is not None and session.session_key:
        session_sockets_close(session_key=session.session_key, reason="Logged out")
