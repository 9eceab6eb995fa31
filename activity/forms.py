"""The session login forms (dashboards and admin), with lockout of repeated failures."""
from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm

from activity.lockout import lockout_message, lockout_remaining
from activity.services import activity_record, request_origin


class LockoutMixin:
    """Refuse locked-out accounts and addresses before any password is checked.

    Mixed into an ``AuthenticationForm``: it reads the form's ``data`` and ``request``.
    """

    data: Any
    request: Any

    def check_lockout(self) -> None:
        """Raise a ``locked`` validation error while the account or address is locked.

        The refusal is recorded (``login_locked``), as the token endpoint records it.
        """
        username = str(self.data.get("username") or "")
        ip_address, user_agent = request_origin(self.request)
        remaining = lockout_remaining(username=username or None, ip_address=ip_address)
        if remaining:
            activity_record(action="login_locked", username=username[:150],
                            ip_address=ip_address, user_agent=user_agent,
                            details={"via": "session", "retry_after": remaining})
            raise forms.ValidationError(lockout_message(remaining), code="locked")

    def clean(self) -> dict[str, Any]:
        """Check the lockout before the password."""
        self.check_lockout()
        return super().clean()  # type: ignore[misc]


class LockoutAuthenticationForm(LockoutMixin, AuthenticationForm):
    """The dashboards' login form: Django's, refusing locked-out accounts and addresses."""


class LockoutAdminAuthenticationForm(LockoutMixin, AdminAuthenticationForm):
    """Django's admin login form that refuses locked-out accounts and addresses first."""
