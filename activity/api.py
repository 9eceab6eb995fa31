"""REST API of user activity (staff with ``activity.view_useractivity``), and the token
endpoints that record logins."""
from __future__ import annotations

from typing import Any

from rest_framework import permissions, serializers, viewsets
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework_simplejwt.tokens import RefreshToken
from rest_framework_simplejwt.views import TokenBlacklistView, TokenObtainPairView

from activity.lockout import lockout_message, lockout_remaining
from activity.models import UserActivity
from activity.services import activity_record, request_origin
from sysmanage import permissions as access


class UserActivitySerializer(serializers.ModelSerializer):
    """One activity record."""

    user_id = serializers.UUIDField(source="user.pk", read_only=True, default=None)

    class Meta:
        model = UserActivity
        fields = ["id", "user_id", "username", "action", "ip_address", "user_agent",
                  "timestamp", "details"]
        read_only_fields = fields


class UserActivityViewSet(viewsets.ReadOnlyModelViewSet):
    """User activity, newest first.

    Filters: ``?user=`` (id), ``?username=``, ``?action=``, ``?ip_address=``, and
    ``?since=`` / ``?until=`` (ISO-8601 times).
    """

    serializer_class = UserActivitySerializer
    permission_classes = [permissions.IsAuthenticated, access.RequiresRight]
    action_rights = {"list": "view_activity", "retrieve": "view_activity"}

    def get_queryset(self) -> Any:
        """Activity narrowed by the query parameters."""
        queryset = UserActivity.objects.select_related("user")
        params = self.request.query_params
        for param, field in (("user", "user_id"), ("username", "username"),
                             ("action", "action"), ("ip_address", "ip_address"),
                             ("since", "timestamp__gte"), ("until", "timestamp__lt")):
            if params.get(param):
                queryset = queryset.filter(**{field: params[param]})
        return queryset


class LoginTokenView(TokenObtainPairView):
    """``POST /api/token/``: username and password in, access and refresh tokens out."""

    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Refuse locked-out logins, else issue tokens and record the login."""
        ip, _ = request_origin(request)
        username = request.data.get("username") if hasattr(request.data, "get") else None
        remaining = lockout_remaining(username=str(username or "") or None, ip_address=ip)
        if remaining:
            activity_record(action="login_locked", username=str(username or "")[:150],
                            ip_address=ip, user_agent=request_origin(request)[1],
                            details={"via": "token", "retry_after": remaining})
            return Response({"detail": lockout_message(remaining), "code": "login_locked",
                             "retry_after": remaining}, status=429,
                            headers={"Retry-After": str(remaining)})
        response = super().post(request, *args, **kwargs)
        if response.status_code == 200:
            user_id = RefreshToken(response.data["refresh"]).payload.get("user_id")
            from django.contrib.auth import get_user_model

            user = get_user_model().objects.get(pk=user_id)
            ip, agent = request_origin(request)
            activity_record(action="login", user=user, ip_address=ip, user_agent=agent,
                            details={"via": "token"})
        return response


class LogoutTokenView(TokenBlacklistView):
    """``POST /api/token/logout/``: blacklist a refresh token and record the logout."""

    def post(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Blacklist the refresh token and record the logout."""
        user_id = None
        try:
            user_id = RefreshToken(request.data.get("refresh", "")).payload.get("user_id")
        except Exception:  # invalid tokens are reported by the parent view
            user_id = None
        response = super().post(request, *args, **kwargs)
        if response.status_code == 200 and user_id:
            from django.contrib.auth import get_user_model

            user = get_user_model().objects.filter(pk=user_id).first()
            ip, agent = request_origin(request)
            activity_record(action="logout", user=user, ip_address=ip, user_agent=agent,
                            details={"via": "token"})
        return response
