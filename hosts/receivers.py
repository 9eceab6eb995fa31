"""
Changes to who sees which hosts, told to open sockets.

A grant given, changed or taken away, and a host joining or leaving a group that has
grants, change the hosts some users see (``sysmanage.permissions.scope_query``); every
server process then rechecks the sockets concerned (``sysmanage.recheck``), which take
the new scope within seconds.  Groups without grants change no one's view, so hosts
enrolled into them in bulk cost no recheck.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db.models import Model
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import receiver

from hosts.models import Host, HostGroupGrant
from sysmanage.services import user_access_recheck


def _holders(grant: HostGroupGrant) -> list[str] | None:
    """The users a grant reaches: its user, or (for a Django group) everyone."""
    return [str(grant.user_id)] if grant.user_id is not None else None


@receiver(post_save, sender=HostGroupGrant)
@receiver(post_delete, sender=HostGroupGrant)
def recheck_after_grant_change(
    sender: type[HostGroupGrant], instance: HostGroupGrant, **kwargs: object
) -> None:
    """Called when a grant is saved or deleted (deleting a group deletes its grants)."""
    user_access_recheck(user_ids=_holders(instance))


@receiver(m2m_changed, sender=Host.groups.through)
def recheck_after_membership_change(
    sender: type[Model],
    instance: Model,
    action: str,
    reverse: bool,
    pk_set: Iterable[object] | None = None,
    **kwargs: object,
) -> None:
    """Called when hosts join or leave groups (either side of the relation)."""
    if action not in ("post_add", "post_remove", "pre_clear"):
        return
    if reverse:  # a group's hosts changed
        groups: list[Any] = [instance.pk]
    elif action == "pre_clear":  # a host leaves all its groups: read them before
        groups = list(
            Host.groups.through.objects.filter(host_id=instance.pk).values_list(
                "hostgroup_id", flat=True
            )
        )
    else:
        groups = list(pk_set or ())
    if groups and HostGroupGrant.objects.filter(host_group_id__in=groups).exists():
        user_access_recheck(user_ids=None)
