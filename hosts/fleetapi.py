"""
``/api/fleet-runs/``: start a fleet run (``POST``, the parameters of the WebSocket
extension, :mod:`hosts.fleetruns`), list runs newest first and read one with each
host's outcome.  The command's text is shown as for one command: to its requester and
holders of ``hosts.view_command_output``.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import serializers, viewsets
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from hosts import fleetrunner, fleetruns, patchapply
from hosts.models import PACKAGE_CHANGES, FleetRun, FleetRunKind
from sysmanage import permissions
from sysmanage.audit import request_actor
from sysmanage.pagination import CappedLimitOffsetPagination
from sysmanage.topics import parse_uuid


def _shown(request: Request, run: FleetRun, *, with_hosts: bool) -> dict[str, Any]:
    data = fleetruns.fleet_run_data(run, with_hosts=with_hosts)
    visible = permissions.can_see_command_output(request.user, run.requested_by_id)
    if not visible:
        data["command"] = None
    data["redacted"] = not visible
    return data


class FleetRunFilterSerializer(serializers.Serializer[None]):
    """Hosts matching all of: a text in their hostname or FQDN, a text in their OS name."""

    search = serializers.CharField(required=False)
    os = serializers.CharField(required=False)


class FleetRunTargetsSerializer(serializers.Serializer[None]):
    """What a run targets: host groups by name, hosts by id, hosts matching a filter
    (any of them, together)."""

    groups = serializers.ListField(child=serializers.CharField(), required=False)
    host_ids = serializers.ListField(child=serializers.UUIDField(), required=False)
    filter = FleetRunFilterSerializer(required=False)


class FleetRunRequestSerializer(serializers.Serializer[None]):
    """``POST /api/fleet-runs/`` (for the schema; :func:`hosts.fleetruns.parse_fleet_run`
    checks it)."""

    targets = FleetRunTargetsSerializer()
    kind = serializers.ChoiceField(choices=FleetRunKind.choices, required=False)
    command = serializers.CharField(required=False, help_text="for a shell command")
    operation = serializers.ChoiceField(
        choices=PACKAGE_CHANGES, required=False, help_text="for a package run"
    )
    package = serializers.CharField(required=False, help_text="for a package run")
    which = serializers.ChoiceField(
        choices=patchapply.WHICH, required=False, help_text="for a patch run: all by default"
    )
    packages = serializers.ListField(
        child=serializers.CharField(),
        required=False,
        help_text="for a patch run with which=packages",
    )
    timeout = serializers.IntegerField(
        required=False,
        help_text="seconds per host: 30 by default, 600 for a package run, 1800 for a "
        "patch run, 900 for a reboot run (until the host is back)",
    )
    batch_size = serializers.IntegerField(required=False, default=5)
    failure_limit = serializers.CharField(
        required=False, help_text="a number of hosts, or a percent such as '20%'"
    )
    offline = serializers.ChoiceField(choices=fleetruns.OFFLINE_POLICIES, required=False)
    offline_wait = serializers.IntegerField(
        required=False, help_text="with offline=wait: seconds to wait for them, default 600"
    )


_RUN_ID = OpenApiParameter("id", OpenApiTypes.UUID, OpenApiParameter.PATH)


@extend_schema_view(
    list=extend_schema(operation_id="fleet_runs_list", responses=OpenApiTypes.OBJECT),
    retrieve=extend_schema(parameters=[_RUN_ID], responses=OpenApiTypes.OBJECT),
    create=extend_schema(request=FleetRunRequestSerializer, responses={202: OpenApiTypes.OBJECT}),
)
class FleetRunViewSet(viewsets.ViewSet):
    """Fleet runs: those who see every host read them all, others their own; starting
    one needs ``run_command`` on every targeted host (checked by
    :func:`hosts.fleetruns.fleet_run_create`)."""

    permission_classes = [IsAuthenticated]

    def _runs(self) -> QuerySet[FleetRun]:
        return permissions.fleet_runs_visible(
            FleetRun.objects.select_related("requested_by").order_by("-created_at"),
            self.request.user,
        )

    def list(self, request: Request) -> Response:
        """Runs, newest first, with their counts."""
        paginator = CappedLimitOffsetPagination()
        page = paginator.paginate_queryset(self._runs(), request, view=self) or []
        return paginator.get_paginated_response(
            [_shown(request, run, with_hosts=False) for run in page]
        )

    def retrieve(self, request: Request, pk: str | None = None) -> Response:
        """One run, with each host's outcome."""
        try:
            run_id = parse_uuid(pk)
        except ValueError:
            return Response({"detail": "No fleet run with this id"}, status=404)
        run = get_object_or_404(self._runs(), pk=run_id)
        return Response(_shown(request, run, with_hosts=True))

    def create(self, request: Request) -> Response:
        """Start a run; 202 with the run (it goes on in this server process)."""
        if not isinstance(request.data, dict):
            return Response({"detail": "The body must be a JSON object"}, status=400)
        kind = request.data.get("kind", FleetRunKind.COMMAND)
        if kind not in FleetRunKind.values:
            kinds = ", ".join(f"'{k}'" for k in FleetRunKind.values)
            return Response({"detail": f"'kind' must be one of {kinds}"}, status=400)
        try:
            spec = fleetruns.parse_fleet_run(request.data, kind)
            run = fleetruns.fleet_run_create(
                spec=spec, user=request.user, actor=request_actor(request)
            )
        except fleetruns.FleetRunRefused as exc:
            return Response(
                {"detail": str(exc), "refused": exc.refused, "total": exc.total}, status=403
            )
        except fleetruns.FleetRunLimitReached as exc:
            return Response({"detail": str(exc), "limit": exc.limit}, status=429)
        except ValueError as exc:
            return Response({"detail": str(exc)}, status=400)
        async_to_sync(fleetrunner.fleet_run_start)(
            run, user=request.user, actor=request_actor(request)
        )
        return Response(_shown(request, run, with_hosts=False), status=202)
