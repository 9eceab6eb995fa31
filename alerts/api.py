"""REST API of alerts: list, raise, acknowledge, resolve (each write needs its right)."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from alerts import selectors, services
from alerts.models import Alert, AlertStatus, Severity
from hosts.models import Host
from sysmanage import permissions
from sysmanage.api_input import CsvChoiceField, query_filters
from sysmanage.audit import request_actor


class AlertSerializer(serializers.ModelSerializer[Alert]):
    """An alert with its host's name."""

    hostname = serializers.CharField(source="host.hostname", read_only=True, default=None)

    class Meta:
        model = Alert
        fields = [
            "id",
            "host",
            "hostname",
            "severity",
            "category",
            "title",
            "message",
            "status",
            "created_at",
            "updated_at",
            "acknowledged_at",
            "resolved_at",
        ]
        read_only_fields = fields


class VisibleHostField(serializers.PrimaryKeyRelatedField[Host]):
    """A host by id, among those the requester sees: one out of sight is refused as one
    that does not exist, to the same words, whatever else the request gets wrong."""

    def get_queryset(self) -> QuerySet[Host]:
        """The hosts the requester (``context["request"]``) sees."""
        request = self.context.get("request")
        user = request.user if request is not None else None
        return permissions.visible(Host.objects.all(), user, "id")


class AlertRaiseSerializer(serializers.Serializer[None]):
    """What a person supplies to raise an alert by hand."""

    severity = serializers.ChoiceField(choices=Severity.choices)
    category = serializers.CharField(max_length=50)
    title = serializers.CharField(max_length=200)
    message = serializers.CharField(allow_blank=True, required=False, default="")
    host = VisibleHostField(required=False, allow_null=True)


class AlertFilters(serializers.Serializer[None]):
    """``GET /api/alerts/`` filters."""

    severity = CsvChoiceField(choices=Severity.choices, required=False)
    status = CsvChoiceField(choices=AlertStatus.choices, required=False)
    host = serializers.UUIDField(required=False)


class AlertViewSet(viewsets.ReadOnlyModelViewSet[Alert]):
    """Alerts, newest first. ``?severity=warning,critical``, ``?status=open``, ``?host=``."""

    serializer_class = AlertSerializer

    def get_queryset(self) -> QuerySet[Alert]:
        """Alerts narrowed by the query parameters."""
        filters = query_filters(self.request, AlertFilters)
        host = filters.get("host")
        return permissions.visible(
            selectors.alert_list(
                severity=filters.get("severity") or None,
                status=filters.get("status") or None,
                host_id=str(host) if host else None,
            ),
            self.request.user,
            hostless=True,
        )

    def _require(self, right: str) -> None:
        if not permissions.holds(self.request.user, right):
            raise PermissionDenied(permissions.denial(right))

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Raise an alert by hand (``alerts.add_alert``)."""
        self._require("raise_alert")
        form = AlertRaiseSerializer(data=request.data, context={"request": request})
        form.is_valid(raise_exception=True)
        alert = services.alert_raise(**form.validated_data)
        return Response(AlertSerializer(alert).data, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["post"])
    def acknowledge(self, request: Request, pk: str | None = None) -> Response:
        """Acknowledge an open alert (``alerts.change_alert``)."""
        return self._transition(services.alert_acknowledge, pk)

    @action(detail=True, methods=["post"])
    def resolve(self, request: Request, pk: str | None = None) -> Response:
        """Resolve an open or acknowledged alert (``alerts.change_alert``)."""
        return self._transition(services.alert_resolve, pk)

    def _transition(self, service: services.AlertTransition, pk: str | None) -> Response:
        # Someone who may manage alerts nowhere is refused whatever the alert.  DRF's
        # lookup answers 404 for ids that are not UUIDs (Django's raised a 500), and for
        # alerts about hosts the user does not see.
        user = self.request.user
        if not permissions.holds(user, "manage_alert") and not permissions.may_anywhere(
            user, "manage_alert"
        ):
            raise PermissionDenied(permissions.denial("manage_alert"))
        found = self.get_object()
        if found.host_id is None:
            self._require("manage_alert")
        elif not permissions.may_on_host(self.request.user, "manage_alert", found.host_id):
            raise PermissionDenied(permissions.denial("manage_alert"))
        alert_id = found.pk
        try:
            alert = service(alert_id=alert_id, actor=request_actor(self.request))
        except services.AlertStateError as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        return Response(AlertSerializer(alert).data)
