"""The session login form, with lockout of repeated failures."""
from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.admin.forms import AdminAuthenticationForm

from activity.lockout import lockout_message, lockout_remaining


class LockoutAdminAuthenticationForm(AdminAuthenticationForm):
    """Django's admin login form that refuses locked-out accounts and addresses first."""

    def clean(self) -> dict[str, Any]:
        """Check the lockout before the password."""
        request = self.request
        remaining = lockout_remaining(
            username=self.data.get("username"),
            ip_address=request.META.get("REMOTE_ADDR") if request is not None else None)
        if remaining:
            raise forms.ValidationError(lockout_message(remaining), code="locked")
        return super().clean()
