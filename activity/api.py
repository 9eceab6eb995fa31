"""REST API of user activity (staff with ``activity.view_useractivity``), and the token
endpoints that record logins."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import QuerySet
from rest_framework import permissions, serializers, viewsets
from rest_framework.exceptions import AuthenticationFailed, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework_simplejwt.exceptions import TokenError
from rest_framework_simplejwt.settings import api_settings
from rest_framework_simplejwt.tokens import RefreshToken
from rest_framework_simplejwt.views import (
    TokenBlacklistView,
    TokenObtainPairView,
    TokenRefreshView,
)

from activity.lockout import LoginRefusal, login_attempt_end, login_attempt_start
from activity.models import UserActivity
from activity.services import activity_record, request_origin
from sysmanage import permissions as access
from sysmanage.api_input import query_filters
from sysmanage.credentials import SESSION_CLAIM, decode
from sysmanage.services import token_session_grace_end, token_session_sockets_close


class UserActivitySerializer(serializers.ModelSerializer[UserActivity]):
    """One activity record."""

    user_id = serializers.UUIDField(source="user.pk", read_only=True, default=None)

    class Meta:
        model = UserActivity
        fields = [
            "id",
            "user_id",
            "username",
            "action",
            "ip_address",
            "user_agent",
            "timestamp",
            "details",
        ]
        read_only_fields = fields


class ActivityFilters(serializers.Serializer[None]):
    """``GET /api/activity/`` filters."""

    user = serializers.UUIDField(required=False)
    username = serializers.CharField(max_length=150, required=False)
    action = serializers.CharField(max_length=50, required=False)
    ip_address = serializers.IPAddressField(required=False)
    since = serializers.DateTimeField(required=False)
    until = serializers.DateTimeField(required=False)


class UserActivityViewSet(viewsets.ReadOnlyModelViewSet[UserActivity]):
    """User activity, newest first.

    Filters: ``?user=`` (id), ``?username=``, ``?action=``, ``?ip_address=``, and
    ``?since=`` / ``?until=`` (ISO-8601 times).
    """

    serializer_class = UserActivitySerializer
    permission_classes = [permissions.IsAuthenticated, access.RequiresRight]
    action_rights = {"list": "view_activity", "retrieve": "view_activity"}

    def get_queryset(self) -> QuerySet[UserActivity]:
        """Activity narrowed by the query parameters."""
        filters = query_filters(self.request, ActivityFilters)
        queryset = UserActivity.objects.select_related("user")
        for param, field in (
            ("user", "user_id"),
            ("username", "username"),
            ("action", "action"),
            ("ip_address", "ip_address"),
            ("since", "timestamp__gte"),
            ("until", "timestamp__lt"),
        ):
            if param in filters:
                queryset = queryset.filter(**{field: filters[param]})
        return queryset


class LoginTokenView(TokenObtainPairView):
    """``POST /api/token/``: username and password in, access and refresh tokens out."""

    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Refuse locked-out logins, else check the password, issue tokens and record
        the login.  The username is normalized once, for the lockout and the check."""
        data = request.data if isinstance(request.data, Mapping) else {}
        attempt = login_attempt_start(
            request=request, raw_username=data.get("username"), via="token"
        )
        if isinstance(attempt, LoginRefusal):
            return Response(
                {
                    "detail": attempt.message,
                    "code": attempt.code,
                    "retry_after": attempt.retry_after,
                },
                status=429,
                headers={"Retry-After": str(attempt.retry_after)},
            )
        if attempt is None:  # checked no further: nothing may reach a password check
            return Response(
                {
                    "detail": "Send a username (a non-empty string) and a password.",
                    "code": "invalid_credentials",
                },
                status=400,
            )
        serializer = self.get_serializer(data={**data, "username": attempt.username})
        try:
            serializer.is_valid(raise_exception=True)
        except AuthenticationFailed:
            login_attempt_end(attempt, outcome="failed")
            raise
        except (ValidationError, TokenError):
            login_attempt_end(attempt, outcome="not_checked")
            raise
        login_attempt_end(attempt, outcome="succeeded")
        self._record_login(request, serializer.validated_data["refresh"])
        return Response(serializer.validated_data, status=200)

    @staticmethod
    def _record_login(request: Request, refresh: str) -> None:
        user = get_user_model().objects.get(pk=_user_and_session_of(refresh)[0])
        ip, agent = request_origin(request)
        activity_record(
            action="login", user=user, ip_address=ip, user_agent=agent, details={"via": "token"}
        )


class RefreshTokenView(TokenRefreshView):
    """``POST /api/token/refresh/``: a refresh token in, new access and refresh tokens
    out (the old refresh token is blacklisted).  The serializer
    (``sysmanage.credentials.FingerprintTokenRefreshSerializer``, from the settings)
    answers 401 for a token whose user was deleted or disabled, or whose credentials
    changed since it was issued."""


class LogoutTokenView(TokenBlacklistView):
    """``POST /api/token/logout/``: blacklist a refresh token and record the logout."""

    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Blacklist the refresh token and record the logout."""
        refresh = request.data.get("refresh", "") if isinstance(request.data, dict) else ""
        user_id: str | None
        try:
            user_id, session = _user_and_session_of(refresh)
        except Exception:  # invalid tokens are reported by the parent view
            user_id, session = None, None
        response = super().post(request, *args, **kwargs)
        if response.status_code == 200 and session:
            token_session_grace_end(session=session)
            token_session_sockets_close(session=session, reason="Logged out")
        if response.status_code == 200 and user_id:
            user = get_user_model().objects.filter(pk=user_id).first()
            ip, agent = request_origin(request)
            activity_record(
                action="logout",
                user=user,
                ip_address=ip,
                user_agent=agent,
                details={"via": "token"},
            )
        return response


def _user_and_session_of(refresh: object) -> tuple[str, str | None]:
    """The user id and sign-in (``sid``) claims of a valid refresh token (raises
    ``TokenError`` otherwise; tokens from before sign-ins were named have none)."""
    if not isinstance(refresh, str):
        raise TokenError("the refresh token must be a string")
    payload = decode(RefreshToken, refresh).payload
    claim = payload.get(api_settings.USER_ID_CLAIM)
    if not isinstance(claim, str):
        raise TokenError("the refresh token names no user")
    session = payload.get(SESSION_CLAIM)
    return claim, session if isinstance(session, str) else None
