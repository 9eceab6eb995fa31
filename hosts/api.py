"""REST API of hosts, command executions and package operations."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone
from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from hosts import selectors
from hosts.models import CommandExecution, Host, PackageOperation


class HostSerializer(serializers.ModelSerializer):
    """A host with its reported facts."""

    class Meta:
        model = Host
        fields = [
            "id", "hostname", "fqdn", "ip_addresses", "os_name", "os_version", "kernel",
            "architecture", "cpu_count", "memory_total", "agent_version", "status",
            "last_seen", "created_at", "updated_at",
        ]
        read_only_fields = fields


class HostViewSet(viewsets.ReadOnlyModelViewSet):
    """Managed hosts. ``?search=`` matches hostname and FQDN; ``?status=`` filters."""

    serializer_class = HostSerializer

    def get_queryset(self) -> Any:
        """Hosts narrowed by the query parameters."""
        params = self.request.query_params
        return selectors.host_list(search=params.get("search"), status=params.get("status"))

    @action(detail=True, methods=["get"])
    def metrics(self, request: Request, pk: str | None = None) -> Response:
        """Per-minute metrics history; ``?minutes=`` (default 60, at most 10080)."""
        host = self.get_object()
        try:
            minutes = max(1, min(10080, int(request.query_params.get("minutes", 60))))
        except ValueError:
            return Response({"detail": "minutes must be an integer"}, status=400)
        since = timezone.now() - timedelta(minutes=minutes)
        return Response({"host_id": str(host.id), "minutes": minutes,
                         "samples": selectors.metric_history(str(host.id), since=since)})


class CommandExecutionSerializer(serializers.ModelSerializer):
    """A command run on a host, and its result."""

    hostname = serializers.CharField(source="host.hostname", read_only=True)
    requested_by = serializers.CharField(source="requested_by.username", read_only=True,
                                         default=None)

    class Meta:
        model = CommandExecution
        fields = [
            "id", "host", "hostname", "command", "timeout", "status", "exit_code", "stdout",
            "stderr", "execution_time", "error", "requested_by", "created_at", "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class CommandExecutionViewSet(viewsets.ReadOnlyModelViewSet):
    """Command executions, newest first; ``?host=`` and ``?status=`` filter."""

    serializer_class = CommandExecutionSerializer

    def get_queryset(self) -> Any:
        """Executions narrowed by the query parameters."""
        queryset = CommandExecution.objects.select_related("host", "requested_by")
        params = self.request.query_params
        if params.get("host"):
            queryset = queryset.filter(host_id=params["host"])
        if params.get("status"):
            queryset = queryset.filter(status=params["status"])
        return queryset


class PackageOperationSerializer(serializers.ModelSerializer):
    """A package operation on a host, with its progress."""

    hostname = serializers.CharField(source="host.hostname", read_only=True)
    requested_by = serializers.CharField(source="requested_by.username", read_only=True,
                                         default=None)

    class Meta:
        model = PackageOperation
        fields = [
            "id", "host", "hostname", "operation", "package", "status", "progress", "message",
            "output", "requested_by", "created_at", "updated_at", "finished_at",
        ]
        read_only_fields = fields


class PackageOperationViewSet(viewsets.ReadOnlyModelViewSet):
    """Package operations, newest first; ``?host=`` and ``?status=`` filter."""

    serializer_class = PackageOperationSerializer

    def get_queryset(self) -> Any:
        """Operations narrowed by the query parameters."""
        queryset = PackageOperation.objects.select_related("host", "requested_by")
        params = self.request.query_params
        if params.get("host"):
            queryset = queryset.filter(host_id=params["host"])
        if params.get("status"):
            queryset = queryset.filter(status=params["status"])
        return queryset


