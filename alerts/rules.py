"""
Alert rule evaluation, in memory.

:class:`RuleEngine` sees every metrics report of the hosts whose agents are connected to
this process.  It keeps, per host, rule and instance (a mount point for disk rules), how
many samples in a row were over a threshold and which severity the database holds, and
returns a :class:`Verdict` only when that severity should change.  So the database is
written when an alert is raised, raised in severity, lowered or resolved, never per
report.  Lowering and resolving need the value to fall ``clear_margin`` below the
threshold, so a value hovering at a threshold does not flap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from alerts.models import AlertRule

#: The rules that judge a host's state rather than its metrics reports.
HOST_STATE_METRICS = frozenset({"host_offline", "reboot_required", "cert_expiry"})
#: The severity of an alert a rule raises (``alerts.models.Severity`` has ``info`` too).
Level = Literal["warning", "critical"]
SEVERITY_ORDER: dict[Level | None, int] = {None: 0, "warning": 1, "critical": 2}
#: The database state is not known yet (first report since start).
UNKNOWN: Final = "unknown"
#: What the engine believes the database holds: no alert, an alert of a level, or unknown.
Known = Level | None | Literal["unknown"]


@dataclass(frozen=True)
class RuleSpec:
    """The parts of an :class:`~alerts.models.AlertRule` the engine needs."""

    id: str
    name: str
    metric: str
    category: str
    warning: float | None
    critical: float | None
    sustained: int
    margin: float

    @classmethod
    def from_model(cls, rule: AlertRule) -> RuleSpec:
        """Copy a rule row."""
        return cls(
            id=str(rule.id),
            name=rule.name,
            metric=rule.metric,
            category=rule.category,
            warning=rule.warning_threshold,
            critical=rule.critical_threshold,
            sustained=max(1, rule.sustained_samples),
            margin=max(0.0, rule.clear_margin),
        )


@dataclass(frozen=True)
class Verdict:
    """What the database should show for one host, rule and instance."""

    host_id: str
    hostname: str
    rule: RuleSpec
    key: str
    severity: Level | None  # None: no active alert
    value: float


def _level(rule: RuleSpec, value: float, margin: float = 0.0) -> Level | None:
    if rule.critical is not None and value >= rule.critical - margin:
        return "critical"
    if rule.warning is not None and value >= rule.warning - margin:
        return "warning"
    return None


def rule_values(
    rule: RuleSpec, metrics: Mapping[str, Any], cpu_count: int | None
) -> list[tuple[str, float]]:
    """The ``(instance key, value)`` pairs a metrics report gives for ``rule``."""
    if rule.metric == "disk_usage":
        return sorted(
            (str(mount), float(v)) for mount, v in (metrics.get("disk_usage") or {}).items()
        )
    if rule.metric in ("memory_usage", "cpu_usage") and metrics.get(rule.metric) is not None:
        return [("", float(metrics[rule.metric]))]
    if rule.metric == "load_per_cpu" and metrics.get("load_average") and cpu_count:
        return [("", round(float(metrics["load_average"][0]) / cpu_count, 2))]
    return []


class RuleEngine:
    """Per-process evaluation state; see the module docstring."""

    def __init__(self) -> None:
        self.rules: list[RuleSpec] | None = None
        #: the rules that judge metrics reports (not "host offline")
        self._judging: list[RuleSpec] = []
        #: samples in a row over a threshold, where there are any
        self._streaks: dict[tuple[str, str, str], int] = {}
        self._known: dict[tuple[str, str, str], Level | None] = {}

    def set_rules(self, rules: list[RuleSpec]) -> None:
        """Replace the rules; state of rules that disappeared is dropped."""
        ids = {r.id for r in rules}
        self.rules = rules
        self._judging = [r for r in rules if r.metric not in HOST_STATE_METRICS]
        for store in (self._streaks, self._known):
            for key in [k for k in store if k[1] not in ids]:
                del store[key]

    def forget_host(self, host_id: str) -> None:
        """Drop a host's state (its agent moved away or it was deleted)."""
        for store in (self._streaks, self._known):
            for key in [k for k in store if k[0] == host_id]:
                del store[key]

    def host_ids(self) -> set[str]:
        """The hosts this engine holds state for."""
        return {key[0] for store in (self._streaks, self._known) for key in store}

    def observe(
        self, host_id: str, hostname: str, metrics: Mapping[str, Any], cpu_count: int | None
    ) -> list[Verdict]:
        """Evaluate one metrics report; return the changes the database needs."""
        verdicts = []
        for rule in self._judging:
            for key, value in rule_values(rule, metrics, cpu_count):
                severity = self._judge((host_id, rule.id, key), rule, value)
                if severity != UNKNOWN:
                    verdicts.append(Verdict(host_id, hostname, rule, key, severity, value))
        return verdicts

    def _judge(self, state: tuple[str, str, str], rule: RuleSpec, value: float) -> Known:
        """The new severity for ``state``, or ``UNKNOWN`` when nothing changes."""
        current: Known = self._known.get(state, UNKNOWN)
        held = _level(rule, value, rule.margin)
        if held is None and current is None:
            # Clear of every threshold by the margin, and no alert: what nearly every
            # report of a healthy fleet finds.
            if state in self._streaks:
                del self._streaks[state]
            return UNKNOWN
        breach = _level(rule, value)
        streak = self._streaks.get(state, 0) + 1 if breach else 0
        if streak:
            self._streaks[state] = streak
        else:
            self._streaks.pop(state, None)
        raised = breach if streak >= rule.sustained else None
        if current == UNKNOWN:
            # After a start the database may hold an alert from before: decide only when
            # the value clearly calls for an alert, or clearly for none.
            if raised is None and held is not None:
                return UNKNOWN
            target = raised
        elif current is None:
            target = raised
        else:
            kept = current if SEVERITY_ORDER[held] >= SEVERITY_ORDER[current] else held
            target = max(raised, kept, key=SEVERITY_ORDER.__getitem__)
        if current != UNKNOWN and target == current:
            return UNKNOWN
        self._known[state] = target
        return target
