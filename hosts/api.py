"""REST API of hosts, command executions and package operations."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeVar

from django.db import models
from django.utils import timezone
from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from hosts import patchapply, selectors, services
from hosts.models import (
    CommandExecution,
    ExecutionStatus,
    Host,
    HostGroup,
    HostInventory,
    HostStatus,
    OperationStatus,
    PackageOperation,
)
from hosts.services import HOST_FACT_FIELDS
from sysmanage import permissions
from sysmanage.api_input import query_filters
from sysmanage.audit import request_actor
from sysmanage.protocol import iso


class HostFilters(serializers.Serializer[None]):
    """``GET /api/hosts/`` filters."""

    search = serializers.CharField(max_length=255, required=False)
    status = serializers.ChoiceField(choices=HostStatus.choices, required=False)
    group = serializers.CharField(max_length=100, required=False)


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


class HostGroupNameField(serializers.SlugRelatedField[HostGroup]):
    """A host group given by its name, in any case (as ``?group=`` finds it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(slug_field="name", queryset=HostGroup.objects.all(), **kwargs)

    def to_internal_value(self, data: Any) -> HostGroup:
        """The group named ``data``, or a validation error saying there is none."""
        name = str(data).strip()
        group = HostGroup.objects.filter(name__iexact=name).first()
        if group is None:
            raise serializers.ValidationError(f"No host group named {name[:100]}")
        return group


class HostGroupRefSerializer(serializers.ModelSerializer[HostGroup]):
    """A group a host is in: its id and name."""

    class Meta:
        model = HostGroup
        fields = ["id", "name"]
        read_only_fields = fields


class HostSerializer(serializers.ModelSerializer[Host]):
    """A host with its reported facts and the groups it is in."""

    groups = HostGroupRefSerializer(many=True, read_only=True)

    class Meta:
        model = Host
        fields = [
            "id",
            "hostname",
            *HOST_FACT_FIELDS,
            "agent_kind",
            "status",
            "last_seen",
            "groups",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class HostViewSet(viewsets.ReadOnlyModelViewSet[Host]):
    """Managed hosts. ``?search=`` matches hostname and FQDN; ``?status=`` filters, and
    ``?group=`` (a group's name, in any case) keeps the hosts in that group."""

    serializer_class = HostSerializer

    def get_queryset(self) -> Any:
        """Hosts narrowed by the query parameters."""
        filters = query_filters(self.request, HostFilters)
        return selectors.host_list(
            search=filters.get("search"),
            status=filters.get("status"),
            group=filters.get("group"),
            visible=permissions.scope_query(self.request.user),
        )

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
        """The latest reports of the host's agent (SysManage agents send them), by kind:
        ``os``, ``hardware``, ``software`` (installed packages), ``updates`` (available
        updates), ``users`` (users and groups) and ``services`` (services of the server
        packages installed).  ``users`` and ``services`` are stored normalized and bounded
        (docs/sysmanage-agent.md); the others as the agent sent them."""
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

    @action(detail=True, methods=["get"])
    def updates(self, request: Request, pk: str | None = None) -> Response:
        """The host's pending updates (security updates first) and whether it needs a
        reboot, as its agent last reported them (either agent)."""
        host = self.get_object()
        return Response({"host_id": str(host.id), **selectors.host_patch_view(host.id)})

    @action(detail=True, methods=["get"])
    def certificates(self, request: Request, pk: str | None = None) -> Response:
        """The certificates the host's agent last found (SysManage agents report them):
        counts (all, expiring within ``HOST_CERTIFICATE_WARNING_DAYS``, expired, CA),
        then the certificates that are not CA certificates, soonest expiry first, then
        the CA certificates; each with its path, name, subject, issuer, serial, validity,
        whole days left (negative once expired) and whether it is expired or expiring."""
        host = self.get_object()
        return Response({"host_id": str(host.id), **selectors.host_certificates_view(host.id)})

    @action(detail=True, methods=["post"], url_path="check-updates")
    def check_updates(self, request: Request, pk: str | None = None) -> Response:
        """Ask the host's agent to check for updates now (202; it reports what it finds
        as usual); needs the right to run commands on the host (the model permission, or
        a grant of one of its groups that gives it).  A host out of sight: 404."""
        host = self.get_object()
        if not permissions.hosts_allowed(request.user, "run_command", [host.id]):
            return Response({"detail": permissions.denial("run_command")}, status=403)
        services.host_updates_check_request(host=host, actor=request_actor(request))
        return Response({"host_id": str(host.id), "requested": True}, status=202)

    @action(
        detail=True,
        methods=["post"],
        url_path="apply-updates",
        permission_classes=[IsAuthenticated],
    )
    def apply_updates(self, request: Request, pk: str | None = None) -> Response:
        """Apply updates on the host (202 with the ``upgrade`` package operation, which
        goes on as ``package_operations`` events): body ``{"which": "all"|"security"|
        "packages", "packages": [names]}``.  Needs the right to apply updates and reboot
        on the host."""
        host = self.get_object()
        refused = _patch_refusal(request, host)
        if refused is not None:
            return refused
        data = request.data if isinstance(request.data, dict) else {}
        try:
            updates = patchapply.parse_updates_request(data)
        except patchapply.PatchRequestError as exc:
            return Response({"detail": str(exc)}, status=400)
        operation = patchapply.host_apply_updates(
            host=host, request=updates, user=request.user, actor=request_actor(request)
        )
        return Response(selectors.operation_event_data(operation.id), status=202)

    @action(detail=True, methods=["post"], permission_classes=[IsAuthenticated])
    def reboot(self, request: Request, pk: str | None = None) -> Response:
        """Reboot the host (202 with the ``reboot`` package operation, which completes
        when the host is back online).  Needs the right to apply updates and reboot on
        the host."""
        host = self.get_object()
        refused = _patch_refusal(request, host)
        if refused is not None:
            return refused
        operation = patchapply.host_reboot(
            host=host, user=request.user, actor=request_actor(request)
        )
        return Response(selectors.operation_event_data(operation.id), status=202)


def _patch_refusal(request: Request, host: Host) -> Response | None:
    """Why applying updates or rebooting ``host`` (in sight) is refused, if it is: 403
    without the right, 409 while its agent is not online."""
    if not permissions.may_on_host(request.user, "patch_reboot", host.id):
        return Response({"detail": permissions.denial("patch_reboot")}, status=403)
    if host.status != HostStatus.ONLINE:
        return Response({"detail": f"{host.hostname} is {host.status}"}, status=409)
    return None


class HostGroupSerializer(serializers.ModelSerializer[HostGroup]):
    """A host group in a list: how many hosts it has (``GET /api/hosts/?group=`` lists
    them)."""

    name = serializers.CharField(max_length=100)
    host_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = HostGroup
        fields = ["id", "name", "description", "host_count", "created_at"]
        read_only_fields = ["id", "host_count", "created_at"]


class HostIdsField(serializers.ListField):
    """The ids of a group's hosts."""

    def get_attribute(self, instance: HostGroup) -> list[Any]:
        """The ids, read from the database (in hostname order): of the hosts the reader
        sees."""
        hosts = instance.hosts.order_by("hostname")
        request = self.context.get("request")
        if request is not None:
            hosts = permissions.visible(hosts, request.user, "id")
        return list(hosts.values_list("pk", flat=True))


class HostGroupDetailSerializer(HostGroupSerializer):
    """One host group with the ids of its hosts; writing ``hosts`` makes them its hosts
    (the others leave it)."""

    hosts = HostIdsField(child=serializers.UUIDField(), required=False, max_length=100_000)

    class Meta(HostGroupSerializer.Meta):
        fields = [*HostGroupSerializer.Meta.fields, "hosts"]


class HostGroupViewSet(viewsets.ModelViewSet[HostGroup]):
    """Host groups: every signed-in user may list and read them; creating, changing
    (``hosts`` replaces the members) and deleting one needs the right to manage host
    groups (staff with ``hosts.change_hostgroup``)."""

    action_rights = {
        "create": "manage_host_groups",
        "update": "manage_host_groups",
        "partial_update": "manage_host_groups",
        "destroy": "manage_host_groups",
    }

    def get_permissions(self) -> list[BasePermission]:
        """Reads: signed in, as the hosts; writes: the right as well."""
        if self.action in ("list", "retrieve"):
            return [IsAuthenticated()]
        return [IsAuthenticated(), permissions.RequiresRight()]

    def get_queryset(self) -> Any:
        """Groups by name, with their host counts (of the hosts the user sees)."""
        return selectors.host_group_list(permissions.scope_query(self.request.user))

    def get_serializer_class(self) -> type[HostGroupSerializer]:
        """Member ids for one group and for writes; counts only in a list."""
        return HostGroupSerializer if self.action == "list" else HostGroupDetailSerializer

    def _reply(self, group: HostGroup, status: int = 200) -> Response:
        fresh = self.get_queryset().get(pk=group.pk)
        return Response(HostGroupDetailSerializer(fresh).data, status=status)

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Create a group, with ``hosts`` if given."""
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            group = services.host_group_create(
                name=data["name"],
                description=data.get("description", ""),
                host_ids=data.get("hosts"),
                actor=request_actor(request),
            )
        except ValueError as exc:
            return Response({"detail": str(exc)}, status=400)
        return self._reply(group, status=201)

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Change what the body names (all of name and description for ``PUT``)."""
        group = self.get_object()
        partial = kwargs.get("partial", False)
        serializer = self.get_serializer(group, data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            group = services.host_group_update(
                group_id=group.pk,
                name=data.get("name"),
                description=data.get("description"),
                host_ids=data.get("hosts"),
                actor=request_actor(request),
            )
        except ValueError as exc:
            return Response({"detail": str(exc)}, status=400)
        return self._reply(group)

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Delete the group; its hosts stay."""
        services.host_group_delete(group_id=self.get_object().pk, actor=request_actor(request))
        return Response(status=204)


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
            return permissions.visible(
                selectors.command_list(host_id=filters.get("host"), status=filters.get("status")),
                self.request.user,
            )
        queryset = permissions.visible(
            CommandExecution.objects.select_related("host", "requested_by"), self.request.user
        )
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
            return permissions.visible(
                selectors.package_operation_list(
                    host_id=filters.get("host"), status=filters.get("status")
                ),
                self.request.user,
            )
        queryset = permissions.visible(
            PackageOperation.objects.select_related("host", "requested_by"), self.request.user
        )
        if "host" in filters:
            queryset = queryset.filter(host_id=filters["host"])
        if "status" in filters:
            queryset = queryset.filter(status=filters["status"])
        return queryset
