"""REST API of hosts, command executions and package operations."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeVar

from django.db import models
from django.utils import timezone
from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from hosts import selectors
from hosts.models import (
    CommandExecution,
    ExecutionStatus,
    Host,
    HostInventory,
    HostStatus,
    OperationStatus,
    PackageOperation,
)
from hosts.services import HOST_FACT_FIELDS
from sysmanage import permissions
from sysmanage.api_input import query_filters
from sysmanage.protocol import iso


class HostFilters(serializers.Serializer[None]):
    """``GET /api/hosts/`` filters."""

    search = serializers.CharField(max_length=255, required=False)
    status = serializers.ChoiceField(choices=HostStatus.choices, required=False)


#: The longest metrics history one request reads, in minutes (a week).
METRICS_MAX_MINUTES = 10080


class MetricsRange(serializers.Serializer[None]):
    """``GET /api/hosts/<id>/metrics/`` range: ``?since=`` and ``?until=``, ISO times."""

    since = serializers.DateTimeField(required=False)
    until = serializers.DateTimeField(required=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """``since`` must not be after ``until``."""
        if "since" in attrs and "until" in attrs and attrs["since"] > attrs["until"]:
            raise serializers.ValidationError("since must not be after until")
        return attrs


class HostSerializer(serializers.ModelSerializer[Host]):
    """A host with its reported facts."""

    class Meta:
        model = Host
        fields = [
            "id",
            "hostname",
            *HOST_FACT_FIELDS,
            "agent_kind",
            "status",
            "last_seen",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class HostViewSet(viewsets.ReadOnlyModelViewSet[Host]):
    """Managed hosts. ``?search=`` matches hostname and FQDN; ``?status=`` filters."""

    serializer_class = HostSerializer

    def get_queryset(self) -> Any:
        """Hosts narrowed by the query parameters."""
        filters = query_filters(self.request, HostFilters)
        return selectors.host_list(search=filters.get("search"), status=filters.get("status"))

    @action(detail=True, methods=["get"])
    def metrics(self, request: Request, pk: str | None = None) -> Response:
        """Per-minute metrics history: the last ``?minutes=`` (default 60), or the minutes
        that overlap ``?since=`` to ``?until=`` (ISO times; ``until`` defaults to now), at
        most a week back."""
        host = self.get_object()
        bounds = query_filters(request, MetricsRange)
        oldest = timezone.now() - timedelta(minutes=METRICS_MAX_MINUTES)
        minutes: int | None = None
        if "since" in bounds:  # from the start of the minute that holds it
            since = max(oldest, bounds["since"].replace(second=0, microsecond=0))
        else:
            try:
                minutes = max(
                    1, min(METRICS_MAX_MINUTES, int(request.query_params.get("minutes", 60)))
                )
            except ValueError:
                return Response({"detail": "minutes must be an integer"}, status=400)
            since = timezone.now() - timedelta(minutes=minutes)
        until = bounds.get("until")
        return Response(
            {
                "host_id": str(host.id),
                "minutes": minutes,
                "since": iso(since),
                "until": iso(until),
                "samples": selectors.metric_history(str(host.id), since=since, until=until),
            }
        )

    @action(detail=True, methods=["get"])
    def inventory(self, request: Request, pk: str | None = None) -> Response:
        """The latest OS, hardware, installed-package and available-update reports of
        the host's agent (SysManage agents send them)."""
        host = self.get_object()
        return Response(
            {
                "host_id": str(host.id),
                "inventory": {
                    row.kind: {
                        "updated_at": row.updated_at,
                        "item_count": row.item_count,
                        "data": row.data,
                    }
                    for row in HostInventory.objects.filter(host=host)
                },
            }
        )


#: The record a serializer shows.
_Record = TypeVar("_Record", bound=models.Model)


class OutputRedactingSerializer(serializers.ModelSerializer[_Record]):
    """Shows ``PRIVATE_FIELDS`` only to the requester and to holders of
    ``hosts.view_command_output`` (superusers too); others get them as null, with
    ``redacted`` true.  The same rule as the ``command_execution`` channel."""

    PRIVATE_FIELDS: tuple[str, ...] = ()
    hostname = serializers.CharField(source="host.hostname", read_only=True)
    requested_by = serializers.CharField(
        source="requested_by.username", read_only=True, default=None
    )
    redacted = serializers.BooleanField(read_only=True, default=False)

    def to_representation(self, instance: Any) -> dict[str, Any]:
        """The record, its private fields hidden from those who may not see them."""
        data = super().to_representation(instance)
        request = self.context.get("request")
        user = request.user if request is not None else None
        visible = permissions.can_see_command_output(user, instance.requested_by_id)
        if not visible:
            data.update(dict.fromkeys(self.PRIVATE_FIELDS))
        data["redacted"] = not visible
        return data


class CommandExecutionSerializer(OutputRedactingSerializer[CommandExecution]):
    """A command run on a host, and its result (text and output for those who may)."""

    PRIVATE_FIELDS = ("command", "stdout", "stderr", "stdout_bytes", "stderr_bytes", "error")

    class Meta:
        model = CommandExecution
        fields = [
            "id",
            "host",
            "hostname",
            "command",
            "timeout",
            "status",
            "exit_code",
            "stdout",
            "stderr",
            "stdout_truncated",
            "stderr_truncated",
            "stdout_bytes",
            "stderr_bytes",
            "execution_time",
            "error",
            "requested_by",
            "created_at",
            "started_at",
            "finished_at",
            "redacted",
        ]
        read_only_fields = fields


class CommandFilters(serializers.Serializer[None]):
    """``GET /api/commands/`` filters."""

    host = serializers.UUIDField(required=False)
    status = serializers.ChoiceField(choices=ExecutionStatus.choices, required=False)


class CommandExecutionListSerializer(OutputRedactingSerializer[CommandExecution]):
    """A command in a list: the size and first characters of its output and errors
    (``GET /api/commands/<id>/`` has them whole), for those who may see them."""

    PRIVATE_FIELDS = (
        "command",
        "stdout_length",
        "stderr_length",
        "stdout_preview",
        "stderr_preview",
        "stdout_bytes",
        "stderr_bytes",
        "error",
    )

    stdout_length = serializers.IntegerField(read_only=True)
    stderr_length = serializers.IntegerField(read_only=True)
    stdout_preview = serializers.CharField(read_only=True)
    stderr_preview = serializers.CharField(read_only=True)
    error = serializers.CharField(source="error_text", read_only=True)

    class Meta:
        model = CommandExecution
        fields = [
            "id",
            "host",
            "hostname",
            "command",
            "timeout",
            "status",
            "exit_code",
            "stdout_length",
            "stderr_length",
            "stdout_preview",
            "stderr_preview",
            "stdout_truncated",
            "stderr_truncated",
            "stdout_bytes",
            "stderr_bytes",
            "execution_time",
            "error",
            "requested_by",
            "created_at",
            "started_at",
            "finished_at",
            "redacted",
        ]
        read_only_fields = fields


class CommandExecutionViewSet(viewsets.ReadOnlyModelViewSet[CommandExecution]):
    """Command executions, newest first; ``?host=`` and ``?status=`` filter.  Lists
    carry each output's length and first 200 characters; one execution, the whole.
    Every user sees that a command ran; its text and output only the requester and
    holders of ``hosts.view_command_output``."""

    def get_serializer_class(self) -> type[OutputRedactingSerializer[CommandExecution]]:
        """Outputs whole for one execution, in short for a list."""
        return (
            CommandExecutionListSerializer if self.action == "list" else CommandExecutionSerializer
        )

    def get_queryset(self) -> Any:
        """Executions narrowed by the query parameters."""
        filters = query_filters(self.request, CommandFilters)
        if self.action == "list":
            return selectors.command_list(host_id=filters.get("host"), status=filters.get("status"))
        queryset = CommandExecution.objects.select_related("host", "requested_by")
        if "host" in filters:
            queryset = queryset.filter(host_id=filters["host"])
        if "status" in filters:
            queryset = queryset.filter(status=filters["status"])
        return queryset


class PackageOperationSerializer(OutputRedactingSerializer[PackageOperation]):
    """A package operation on a host, with its progress (the package manager's output for
    those who may see it: it can echo configuration and credentials)."""

    PRIVATE_FIELDS = ("output", "output_bytes")

    class Meta:
        model = PackageOperation
        fields = [
            "id",
            "host",
            "hostname",
            "operation",
            "package",
            "status",
            "progress",
            "message",
            "output",
            "output_truncated",
            "output_bytes",
            "requested_by",
            "created_at",
            "updated_at",
            "finished_at",
            "redacted",
        ]
        read_only_fields = fields


class PackageOperationFilters(serializers.Serializer[None]):
    """``GET /api/package-operations/`` filters."""

    host = serializers.UUIDField(required=False)
    status = serializers.ChoiceField(choices=OperationStatus.choices, required=False)


class PackageOperationListSerializer(OutputRedactingSerializer[PackageOperation]):
    """A package operation in a list: the size and first characters of its output
    (``GET /api/package-operations/<id>/`` has it whole), for those who may see it."""

    PRIVATE_FIELDS = ("output_length", "output_preview", "output_bytes")

    output_length = serializers.IntegerField(read_only=True)
    output_preview = serializers.CharField(read_only=True)

    class Meta:
        model = PackageOperation
        fields = [
            "id",
            "host",
            "hostname",
            "operation",
            "package",
            "status",
            "progress",
            "message",
            "output_length",
            "output_preview",
            "output_truncated",
            "output_bytes",
            "requested_by",
            "created_at",
            "updated_at",
            "finished_at",
            "redacted",
        ]
        read_only_fields = fields


class PackageOperationViewSet(viewsets.ReadOnlyModelViewSet[PackageOperation]):
    """Package operations, newest first; ``?host=`` and ``?status=`` filter.  Lists
    carry the output's length and first 200 characters; one operation, the whole."""

    def get_serializer_class(self) -> type[OutputRedactingSerializer[PackageOperation]]:
        """Output whole for one operation, in short for a list."""
        return (
            PackageOperationListSerializer if self.action == "list" else PackageOperationSerializer
        )

    def get_queryset(self) -> Any:
        """Operations narrowed by the query parameters."""
        filters = query_filters(self.request, PackageOperationFilters)
        if self.action == "list":
            return selectors.package_operation_list(
                host_id=filters.get("host"), status=filters.get("status")
            )
        queryset = PackageOperation.objects.select_related("host", "requested_by")
        if "host" in filters:
            queryset = queryset.filter(host_id=filters["host"])
        if "status" in filters:
            queryset = queryset.filter(status=filters["status"])
        return queryset
