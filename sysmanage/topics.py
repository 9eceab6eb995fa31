"""
The seven channels of the WebSocket API, each a small handler class.

A handler authorizes a subscriber, validates and normalizes its filters, decides whether
an event matches them, shapes the delivered payload, and optionally supplies the current
state on subscribe.  The hub and the consumer know channels only through this registry.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Hashable
from typing import Any, ClassVar, TypeVar

from django.conf import settings
from django.db.models import Model, QuerySet

from sysmanage import permissions
from sysmanage.protocol import ALL_HOSTS, ErrorCode, ProtocolError, dumps

Filters = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Viewer:
    """Who a snapshot is read for: a subscriber's user id, socket rights (those of
    :mod:`sysmanage.permissions` that a connection keeps) and the hosts they see (None:
    every host), as the connection held them when it subscribed.  The hub asks the same
    of the connections themselves."""

    user_id: str | None
    rights: frozenset[str] = frozenset()
    scope: permissions.HostScope = None

    @property
    def host_scope(self) -> permissions.HostScope:
        """The hosts seen, by the name connections give it."""
        return self.scope


#: No one in particular: sees only what every subscriber sees (the fleet figures that
#: are published to all are read as this viewer).
NOBODY = Viewer(user_id=None)


def _filters_error(channel: str, message: str, id_: str | int | None) -> ProtocolError:
    return ProtocolError(
        ErrorCode.INVALID_FILTERS,
        message,
        channel="subscription",
        id_=id_,
        requested_channel=channel,
    )


class Topic:
    """Base channel handler: no filters, every event matches, payload unchanged."""

    name: ClassVar[str]
    #: filter name -> (required, parser); parsers raise ValueError with a reason.
    filter_fields: ClassVar[dict[str, tuple[bool, str]]] = {}
    #: whether subscribers get a ``status`` message with the current state at once.
    sends_initial_state: ClassVar[bool] = False
    #: whether :meth:`matches` checks more than the host (the hub indexes subscribers by
    #: ``host_id``, so for the other channels it need not call it per subscriber).
    extra_match: ClassVar[bool] = False
    #: whether what a subscriber sees of an event depends on who they are (the hub then
    #: asks :meth:`audience` per subscriber and frames each audience once).
    per_viewer: ClassVar[bool] = False
    #: whether an event that only repeats the last one of the channel is dropped (the hub
    #: then keeps the channel's last payload and asks :meth:`repeats` per event).
    drops_repeats: ClassVar[bool] = False
    #: whether ``host_id`` may be :data:`~sysmanage.protocol.ALL_HOSTS`: such subscribers
    #: get no event per report but one summary of every host a second
    #: (:mod:`sysmanage.summary`), and their subscription is not resumable.
    summarized: ClassVar[bool] = False
    #: whether its events are figures counted over every host: subscribers who see only
    #: some hosts do not get them, but figures counted over what they see
    #: (:mod:`sysmanage.scopedfigures`).
    scoped_figures: ClassVar[bool] = False

    def authorize(self, user: Any) -> str | None:
        """Return why ``user`` may not subscribe, or None if it may."""
        return permissions.subscribe_denied_reason(user, self.name)

    def clean_filters(self, raw: Filters | None, id_: str | int | None) -> Filters:
        """Validate ``raw`` filters; return the normalized filters in force."""
        raw = raw or {}
        unknown = sorted(set(raw) - set(self.filter_fields))
        if unknown:
            allowed = ", ".join(sorted(self.filter_fields)) or "none"
            raise _filters_error(
                self.name,
                f"Unknown filter(s) {', '.join(unknown)} for channel "
                f"'{self.name}' (allowed: {allowed})",
                id_,
            )
        cleaned: Filters = {}
        for field, (required, kind) in self.filter_fields.items():
            if field not in raw or raw[field] is None:
                if required:
                    raise _filters_error(
                        self.name, f"Channel '{self.name}' requires the filter '{field}'", id_
                    )
                continue
            try:
                cleaned[field] = PARSERS[kind](raw[field])
            except ValueError as exc:
                raise _filters_error(self.name, f"Filter '{field}': {exc}", id_) from None
        return cleaned

    def all_hosts(self, filters: Filters) -> bool:
        """Whether a subscriber with ``filters`` gets the every-host summary."""
        return self.summarized and filters.get("host_id") == ALL_HOSTS

    def matches(self, filters: Filters, data: dict[str, Any]) -> bool:
        """Whether an event with payload ``data`` goes to a subscriber with ``filters``."""
        host_id = filters.get("host_id")
        return host_id is None or data.get("host_id") == host_id

    def variant(self, filters: Filters) -> Hashable:
        """A key naming the payload shape this subscriber gets; equal keys share a frame."""
        return None

    def render(self, filters: Filters, data: dict[str, Any]) -> dict[str, Any]:
        """The payload delivered to a subscriber with ``filters``."""
        return data

    def audience(self, viewer: Any, data: dict[str, Any]) -> Hashable:
        """(``per_viewer`` topics) which version of the event ``viewer`` (a connection or
        a :class:`Viewer`: ``user_id`` and ``rights``) gets; viewers with equal keys share
        a frame."""
        return None

    def render_for(
        self, filters: Filters, data: dict[str, Any], audience: Hashable
    ) -> dict[str, Any]:
        """The payload for a subscriber with ``filters`` in ``audience``."""
        return self.render(filters, data)

    def withholds(self, viewer: Any, data: dict[str, Any]) -> bool:
        """(``per_viewer`` topics) whether ``viewer`` (a connection or a :class:`Viewer`)
        gets nothing of an event about no host in particular that they may not see."""
        return False

    def repeats(self, last: dict[str, Any] | None, data: dict[str, Any]) -> bool:
        """(``drops_repeats`` topics) whether ``data`` tells nothing that ``last``, the
        channel's previous payload, did not."""
        return False

    def present(self, filters: Filters, viewer: Viewer, data: dict[str, Any]) -> dict[str, Any]:
        """``data``, an event payload, as a subscriber with ``filters`` who is ``viewer``
        gets it: what the hub delivers to them, and what snapshots list."""
        audience = self.audience(viewer, data) if self.per_viewer else None
        return self.render_for(filters, data, audience)


def parse_uuid(value: Any) -> str:
    """A UUID in canonical string form."""
    if not isinstance(value, str):
        raise ValueError("must be a UUID string")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"{value[:64]!r} is not a valid UUID") from None


def parse_host_or_all(value: Any) -> str:
    """A host's UUID in canonical string form, or ``"*"`` for every host."""
    if value == ALL_HOSTS:
        return ALL_HOSTS
    try:
        return parse_uuid(value)
    except ValueError as exc:
        raise ValueError(f"{exc}, or '{ALL_HOSTS}' for every host") from None


def _parse_choice_list(value: Any, choices: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be a non-empty list of {what} ({', '.join(choices)})")
    bad = [v for v in value if v not in choices]
    if bad:
        raise ValueError(f"unknown {what} {bad!r} (allowed: {', '.join(choices)})")
    return tuple(c for c in choices if c in value)


SEVERITIES = ("info", "warning", "critical")
METRICS = ("cpu", "memory", "disk", "load")
#: metric filter name -> key in the ``metrics`` payload
METRIC_KEYS = {
    "cpu": "cpu_usage",
    "memory": "memory_usage",
    "disk": "disk_usage",
    "load": "load_average",
}

#: Filter kinds: each parser returns the clean value or raises ``ValueError``.
PARSERS: dict[str, Callable[[Any], object]] = {
    "uuid": parse_uuid,
    "host_or_all": parse_host_or_all,
    "severities": lambda v: _parse_choice_list(v, SEVERITIES, "severity"),
    "metrics": lambda v: _parse_choice_list(v, METRICS, "metric"),
}


class HostStatusTopic(Topic):
    """Host status changes; optional ``host_id``; current state sent on subscribe."""

    name = "host_status"
    filter_fields = {"host_id": (False, "uuid")}
    sends_initial_state = True


class PackageOperationsTopic(Topic):
    """Package operation progress for one host (``host_id`` required); the operations
    not yet finished sent on subscribe."""

    name = "package_operations"
    filter_fields = {"host_id": (True, "uuid")}
    sends_initial_state = True


class CommandExecutionTopic(Topic):
    """Command executions and their results; optional ``host_id``.

    Every subscriber learns that a command ran, where, by whom and how it ended; its
    text and output (``command``, ``stdout``, ``stderr``, ``error``) only the requester
    and holders of ``hosts.view_command_output`` see (they may carry secrets).  Others
    get those fields as null, and ``redacted`` true.  The commands not yet finished are
    sent on subscribe, under the same rule.
    """

    name = "command_execution"
    filter_fields = {"host_id": (False, "uuid"), "run_id": (False, "uuid")}
    sends_initial_state = True
    per_viewer = True
    extra_match = True
    #: the fields only those who may see a command's output get
    PRIVATE_FIELDS = ("command", "stdout", "stderr", "stdout_bytes", "stderr_bytes", "error")

    def matches(self, filters: Filters, data: dict[str, Any]) -> bool:
        """Match on host (if filtered) and on fleet run (``run_id``, if filtered: only
        that run's ``fleet_run.progress`` events)."""
        run_id = filters.get("run_id")
        if run_id is not None and data.get("run_id") != run_id:
            return False
        return super().matches(filters, data)

    def withholds(self, viewer: Any, data: dict[str, Any]) -> bool:
        """A fleet run's progress (about many hosts) only for those who see the run."""
        return "run_id" in data and not permissions.sees_fleet_run(
            scope=getattr(viewer, "host_scope", None),
            user_id=viewer.user_id,
            requested_by_id=data.get("requested_by_id"),
        )

    def audience(self, viewer: Any, data: dict[str, Any]) -> Hashable:
        """True for viewers who see the text and output of this command."""
        return permissions.sees_command_output(
            user_id=viewer.user_id,
            rights=viewer.rights,
            requested_by_id=data.get("requested_by_id"),
        )

    def render_for(
        self, filters: Filters, data: dict[str, Any], audience: Hashable
    ) -> dict[str, Any]:
        """The event, with its text and output only for those who may see them."""
        shown = {k: v for k, v in data.items() if k != "requested_by_id"}
        if audience:
            return {**shown, "redacted": False}
        return {**shown, **dict.fromkeys(self.PRIVATE_FIELDS), "redacted": True}


class SystemAlertsTopic(Topic):
    """Alerts raised and changed; optional ``severity`` list and ``host_id``; the
    unresolved alerts sent on subscribe."""

    name = "system_alerts"
    filter_fields = {"severity": (False, "severities"), "host_id": (False, "uuid")}
    sends_initial_state = True
    extra_match = True

    def matches(self, filters: Filters, data: dict[str, Any]) -> bool:
        """Match on host (if filtered) and on severity (if filtered)."""
        severities = filters.get("severity")
        if severities is not None and data.get("severity") not in severities:
            return False
        return super().matches(filters, data)


class UserActivityTopic(Topic):
    """Logins, logouts and user actions; staff only."""

    name = "user_activity"


class HostMetricsTopic(Topic):
    """Live metrics of one host (``host_id`` required), limited to the ``metrics`` named;
    or, with ``host_id`` ``"*"`` (for those who hold the right), a summary of every host's
    latest metrics once a second."""

    name = "host_metrics"
    filter_fields = {"host_id": (True, "host_or_all"), "metrics": (False, "metrics")}
    summarized = True

    def variant(self, filters: Filters) -> Hashable:
        """Subscribers asking for the same metric names share one serialized frame."""
        return filters.get("metrics")

    def render(self, filters: Filters, data: dict[str, Any]) -> dict[str, Any]:
        """Keep only the metrics the subscriber asked for."""
        wanted = filters.get("metrics")
        if wanted is None:
            return data
        keys = {METRIC_KEYS[m] for m in wanted}
        metrics = {k: v for k, v in data.get("metrics", {}).items() if k in keys}
        return {**data, "metrics": metrics}


class FleetStatusTopic(Topic):
    """Fleet-wide counts; current state sent on subscribe."""

    name = "fleet_status"
    sends_initial_state = True
    drops_repeats = True
    scoped_figures = True

    def matches(self, filters: Filters, data: dict[str, Any]) -> bool:
        """Every fleet event goes to every subscriber."""
        return True

    def repeats(self, last: dict[str, Any] | None, data: dict[str, Any]) -> bool:
        """The same figures as ``last`` (``last_updated`` aside): several processes may
        count the same change, and subscribers need to hear of it once."""
        if last is None:
            return False
        return all(last.get(k) == v for k, v in data.items() if k != "last_updated")


TOPICS: dict[str, Topic] = {
    topic.name: topic
    for topic in (
        HostStatusTopic(),
        PackageOperationsTopic(),
        CommandExecutionTopic(),
        SystemAlertsTopic(),
        UserActivityTopic(),
        HostMetricsTopic(),
        FleetStatusTopic(),
    )
}


def get_topic(name: str | None, id_: str | int | None) -> Topic:
    """Return the handler of channel ``name`` or raise ``UNKNOWN_CHANNEL``."""
    topic = TOPICS.get(name or "")
    if topic is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_CHANNEL,
            f"Unknown channel {str(name)[:64]!r}" if name else "Message has no 'channel'",
            channel="subscription",
            id_=id_,
            requested_channel=name,
            available_channels=sorted(TOPICS),
        )
    return topic


#: Reads the current state of a channel for one subscriber (in a worker thread): called
#: with the subscription's filters and the subscriber, returns the data of the ``status``
#: message.  Items that events also describe go through :meth:`Topic.present`, so that
#: the subscriber sees them as it would see their events (:func:`snapshot_list`).
SnapshotProvider = Callable[[Filters, Viewer], dict[str, Any]]
_SNAPSHOTS: dict[str, SnapshotProvider] = {}


def register_snapshot(channel: str, provider: SnapshotProvider) -> None:
    """Register the function that returns ``channel``'s current state for a subscriber.

    Apps above the core register these from ``AppConfig.ready`` so that the core
    never imports them.
    """
    if channel not in TOPICS:
        raise ValueError(f"unknown channel {channel!r}")
    if channel in _SNAPSHOTS and _SNAPSHOTS[channel] is not provider:
        raise ValueError(f"a snapshot for {channel!r} is registered already")
    _SNAPSHOTS[channel] = provider


def snapshot_provider(channel: str) -> SnapshotProvider | None:
    """The registered current-state function of ``channel``, if any."""
    return _SNAPSHOTS.get(channel)


M = TypeVar("M", bound=Model)
#: Rows a snapshot reads from the database at a time: it stops reading once its budget is
#: spent, so an alert with a megabyte of text costs at most this many such rows in memory.
SNAPSHOT_CHUNK_ROWS = 10


def snapshot_list(
    channel: str,
    key: str,
    rows: QuerySet[M],
    event_data: Callable[[M], dict[str, Any]],
    filters: Filters,
    viewer: Viewer,
) -> dict[str, Any]:
    """A snapshot of the items in ``rows`` (ordered, filtered): ``{key: [...], "count":
    N, "truncated": bool}``.

    Each item is the payload of the event that describes it now (``event_data``), as
    ``viewer`` with ``filters`` gets it (:meth:`Topic.present`).  Items are listed in
    order while there are at most ``WS_SNAPSHOT_MAX_ITEMS`` of them and their JSON takes
    at most ``WS_SNAPSHOT_MAX_BYTES``: the first that does not fit ends the list (one
    larger than the whole budget is never listed).  ``count`` says how many there are in
    all and ``truncated`` whether some were left out.  One query when they all fit, two
    when they do not (the count); ``rows`` must join what ``event_data`` reads.
    """
    topic = TOPICS[channel]
    limit, budget = settings.WS_SNAPSHOT_MAX_ITEMS, settings.WS_SNAPSHOT_MAX_BYTES
    items: list[dict[str, Any]] = []
    size, truncated = 0, False
    for row in rows[: limit + 1].iterator(chunk_size=SNAPSHOT_CHUNK_ROWS):
        if len(items) == limit:
            truncated = True
            break
        item = topic.present(filters, viewer, event_data(row))
        size += len(dumps(item)) + 1  # ASCII, and a comma
        if size > budget:
            truncated = True
            break
        items.append(item)
    # counted apart only when some were left out (a row may come or go meanwhile)
    count = max(rows.count(), len(items) + 1) if truncated else len(items)
    return {key: items, "count": count, "truncated": truncated}


FilterCheck = Any  # Callable[[Any, Any], str | None], run in a worker thread
_FILTER_CHECKS: dict[str, FilterCheck] = {}


def register_filter_check(field: str, check: FilterCheck) -> None:
    """Register a database check of filter ``field`` (e.g. that a ``host_id`` exists),
    called with the value and the subscribing user (as the database has them now): what
    the user may not see is answered as what does not exist."""
    _FILTER_CHECKS[field] = check


def filter_problem(filters: Filters, user: Any = None) -> str | None:
    """Run the registered checks on ``filters`` for ``user``; return the first problem
    found."""
    for field, value in filters.items():
        check = _FILTER_CHECKS.get(field)
        if check is not None and value != ALL_HOSTS:
            problem = check(value, user)
            if problem:
                return f"Filter '{field}': {problem}"
    return None
