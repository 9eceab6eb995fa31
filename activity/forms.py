"""The session login forms (dashboards and admin), with lockout of repeated failures."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm

from activity.lockout import (
    LoginRefusal,
    login_attempt_end,
    login_attempt_start,
    login_username_normalize,
)


class LockoutMixin(AuthenticationForm):
    """Count the attempt, and refuse locked-out ones, before any password is checked.

    Mixed into an ``AuthenticationForm`` (it is one, so that it reads the form's
    ``cleaned_data`` and ``request`` as typed), it authenticates with the username
    normalized as the lockout counts it.
    """

    def clean(self) -> dict[str, Any]:
        """Gate the password check (Django's ``clean``) behind the lockout."""
        username = login_username_normalize(self.cleaned_data.get("username"))
        if username is None or not self.cleaned_data.get("password"):
            return super().clean()  # no password will be checked
        self.cleaned_data["username"] = username
        attempt = login_attempt_start(request=self.request, raw_username=username, via="session")
        if isinstance(attempt, LoginRefusal):
            raise forms.ValidationError(attempt.message, code="locked")
        assert attempt is not None
        try:
            cleaned = super().clean()
        except forms.ValidationError:
            # A right password refused for another reason (an admin form and a user who
            # is not staff) is no guess; a wrong one keeps its place as a failure.
            right = self.user_cache is not None
            login_attempt_end(attempt, outcome="succeeded" if right else "failed")
            raise
        login_attempt_end(attempt, outcome="succeeded")
        return cleaned


class LockoutAuthenticationForm(LockoutMixin, AuthenticationForm):
    """The dashboards' login form: Django's, refusing locked-out accounts and addresses."""


class LockoutAdminAuthenticationForm(LockoutMixin, AdminAuthenticationForm):
    """Django's admin login form that refuses locked-out accounts and addresses first."""
