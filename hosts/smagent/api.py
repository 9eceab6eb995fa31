"""REST API of SysManage-agent enrollment: registrations and their approval,
registration keys, and letting a host's agent register again.  Served through
``hosts.smagent.urls``, which the app registers from its ``ready()``."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from hosts.api import HostGroupNameField
from hosts.models import AgentRegistration, Host, RegistrationKey, RegistrationStatus
from hosts.smagent import enrollment
from hosts.smagent.enrollment import EnrollmentRefused
from sysmanage.api_input import query_filters
from sysmanage.audit import request_actor
from sysmanage.permissions import RequiresRight


class ReregistrationSerializer(serializers.Serializer[Host]):
    """Until when a host's SysManage agent may register again (the reply is built from
    the host by hand; this describes it)."""

    host_id = serializers.UUIDField(read_only=True)
    reregistration_allowed_until = serializers.DateTimeField(read_only=True)


class HostReregistrationViewSet(viewsets.GenericViewSet[Host]):
    """``POST /api/hosts/<id>/allow-reregistration/`` (staff with ``hosts.change_host``)."""

    queryset = Host.objects.all()
    serializer_class = ReregistrationSerializer
    permission_classes = [IsAuthenticated, RequiresRight]
    action_rights = {"allow_reregistration": "manage_host_tokens"}

    @extend_schema(request=None, responses=ReregistrationSerializer)
    def allow_reregistration(self, request: Request, pk: uuid.UUID | None = None) -> Response:
        """Let the host's SysManage agent register again within an hour, once: for an
        agent that lost its identity (staff with ``hosts.change_host``)."""
        host = self.get_object()
        try:
            host = enrollment.allow_reregistration(host_id=host.id, actor=request_actor(request))
        except EnrollmentRefused as exc:
            return Response({"detail": exc.detail}, status=exc.status)
        return Response(
            {
                "host_id": str(host.id),
                "reregistration_allowed_until": host.reregistration_allowed_until,
            }
        )


class AgentRegistrationSerializer(serializers.ModelSerializer[AgentRegistration]):
    """A SysManage agent's registration and where it stands."""

    key = serializers.CharField(source="key.name", read_only=True, default=None)
    decided_by = serializers.CharField(source="decided_by.username", read_only=True, default=None)

    class Meta:
        model = AgentRegistration
        fields = [
            "id",
            "hostname",
            "fqdn",
            "ip_addresses",
            "agent_version",
            "remote_address",
            "status",
            "key",
            "host",
            "for_host",
            "decided_by",
            "decided_at",
            "created_at",
            "details",
        ]
        read_only_fields = fields


class RegistrationFilters(serializers.Serializer[None]):
    """``GET /api/registrations/`` filters."""

    status = serializers.ChoiceField(choices=RegistrationStatus.choices, required=False)


class AgentRegistrationViewSet(viewsets.ReadOnlyModelViewSet[AgentRegistration]):
    """SysManage agent registrations (staff with ``hosts.view_agentregistration``);
    ``?status=pending`` lists those waiting.  ``POST …/approve/`` creates the host;
    ``POST …/reject/`` refuses it (both ``hosts.change_agentregistration``)."""

    serializer_class = AgentRegistrationSerializer
    permission_classes = [IsAuthenticated, RequiresRight]
    action_rights = {
        "list": "view_registrations",
        "retrieve": "view_registrations",
        "approve": "decide_registrations",
        "reject": "decide_registrations",
    }

    def get_queryset(self) -> Any:
        """Registrations, newest first, narrowed by ``?status=``."""
        filters = query_filters(self.request, RegistrationFilters)
        rows = AgentRegistration.objects.select_related("key", "decided_by")
        if "status" in filters:
            rows = rows.filter(status=filters["status"])
        return rows

    def _decide(self, request: Request, decide: Any) -> Response:
        record = self.get_object()
        try:
            decide(registration_id=record.id, actor=request_actor(request))
        except EnrollmentRefused as exc:
            return Response({"detail": exc.detail}, status=exc.status)
        record.refresh_from_db()
        return Response(self.get_serializer(record).data)

    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str | None = None) -> Response:
        """Approve a waiting registration: its host exists from now on."""
        return self._decide(request, enrollment.registration_approve)

    @action(detail=True, methods=["post"])
    def reject(self, request: Request, pk: str | None = None) -> Response:
        """Reject a waiting registration."""
        return self._decide(request, enrollment.registration_reject)


class RegistrationKeySerializer(serializers.ModelSerializer[RegistrationKey]):
    """A registration key (its secret is returned once, on creation)."""

    expires_in_seconds = serializers.IntegerField(
        write_only=True, required=False, min_value=60, max_value=10 * 365 * 86400
    )
    usable = serializers.SerializerMethodField()
    #: the host groups that hosts registering with the key join
    groups = HostGroupNameField(many=True, required=False)

    class Meta:
        model = RegistrationKey
        fields = [
            "id",
            "name",
            "key_prefix",
            "max_uses",
            "uses",
            "expires_at",
            "revoked_at",
            "created_at",
            "expires_in_seconds",
            "groups",
            "usable",
        ]
        read_only_fields = [
            "id",
            "key_prefix",
            "uses",
            "expires_at",
            "revoked_at",
            "created_at",
            "usable",
        ]
        extra_kwargs = {"max_uses": {"min_value": 1}}

    def get_usable(self, key: RegistrationKey) -> bool:
        """Whether agents presenting the key are approved now."""
        return enrollment.key_problem(key) is None


class RegistrationKeyViewSet(
    mixins.CreateModelMixin, viewsets.ReadOnlyModelViewSet[RegistrationKey]
):
    """Registration keys (staff with the model permissions the admin asks): create one
    (the key is in the reply, once; hosts registering with it join its ``groups``, named
    as existing host groups), list them, ``POST …/revoke/``."""

    serializer_class = RegistrationKeySerializer
    permission_classes = [IsAuthenticated, RequiresRight]
    action_rights = {
        "list": "view_registration_keys",
        "retrieve": "view_registration_keys",
        "create": "create_registration_keys",
        "revoke": "revoke_registration_keys",
    }
    queryset = RegistrationKey.objects.prefetch_related("groups")

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Create a key; the reply carries its secret ``key``, which is not stored."""
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        seconds = serializer.validated_data.get("expires_in_seconds")
        key, secret = enrollment.key_create(
            name=serializer.validated_data["name"],
            max_uses=serializer.validated_data.get("max_uses"),
            expires_at=timezone.now() + timedelta(seconds=seconds) if seconds else None,
            groups=serializer.validated_data.get("groups", []),
            actor=request_actor(request),
        )
        return Response(
            {**self.get_serializer(key).data, "key": secret}, status=status.HTTP_201_CREATED
        )

    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str | None = None) -> Response:
        """Revoke the key: agents presenting it are refused from now on."""
        key = enrollment.key_revoke(key_id=self.get_object().id, actor=request_actor(request))
        return Response(self.get_serializer(key).data)
