"""Migrations that a running server survives.

An upgrade migrates the database while the previous release still serves
(deploy/README.md, docs/operations.md "Upgrades"): until every process restarts, the old
code reads and writes the new schema.  So a migration may only add what the old code
can ignore -- a table, a nullable column, a column with a database default
(``db_default``), an index -- and a removal or rename waits for the release after the
one that stopped using the column.  This test holds every migration written since that
rule to it; tests/integration/test_rolling_upgrade.py performs it against PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import migrations, models
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.operations.base import Operation

#: The project's apps, whose migrations are checked.
APPS = ("sysmanage", "hosts", "alerts", "activity")

#: Migrations written before the rule (each app's schema as it stood); they are not
#: changed after release, and hosts 0008 gave the last ones' columns database defaults.
BEFORE_THE_RULE = {
    ("sysmanage", "0001_initial"),
    ("sysmanage", "0002_refreshrotation"),
    ("hosts", "0001_initial"),
    ("hosts", "0002_initial"),
    ("hosts", "0003_agent_tokens_and_metric_history"),
    ("hosts", "0004_sysmanage_agent"),
    ("hosts", "0005_view_command_output"),
    ("hosts", "0006_registration_hardening"),
    ("hosts", "0007_output_truncation"),
    ("alerts", "0001_initial"),
    ("alerts", "0002_initial"),
    ("alerts", "0003_alert_rules"),
    ("alerts", "0004_default_rules"),
    ("activity", "0001_initial"),
    ("activity", "0002_initial"),
    ("activity", "0003_login_counter"),
}

#: Second steps of two-release changes, with why the release before made them safe:
#: {(app, migration): reason}.
CONTRACTIONS: dict[tuple[str, str], str] = {}

#: Operations that take away what the previous release may still use.
_TAKING_AWAY = (
    migrations.RemoveField,
    migrations.RenameField,
    migrations.DeleteModel,
    migrations.RenameModel,
)


def _required_without_database_default(field: models.Field[object, object]) -> bool:
    return (
        not field.null
        and not field.many_to_many
        and not isinstance(field, models.AutoField | models.BigAutoField)
        and field.db_default is models.NOT_PROVIDED
    )


def problems(operations: Iterable[Operation]) -> list[str]:
    """What in ``operations`` the previous release's code could not live with."""
    found = []
    for op in operations:
        if isinstance(op, migrations.AddField | migrations.AlterField):
            field = op.field
            if _required_without_database_default(field):
                found.append(
                    f"{type(op).__name__} {op.model_name}.{op.name}: NOT NULL without "
                    "db_default (the previous release inserts rows without it)"
                )
        elif isinstance(op, _TAKING_AWAY):
            found.append(
                f"{type(op).__name__} {op.describe()}: the previous release still uses it; "
                "stop using it in one release, take it away in the next (CONTRACTIONS)"
            )
    return found


#: Field attributes the database never sees: changing only these alters no column.
_PYTHON_ONLY = {"choices", "help_text", "verbose_name", "validators", "blank", "editable"}


def _only_python_side(loader: MigrationLoader, key: tuple[str, str], op: Operation) -> bool:
    """Whether ``op`` is an AlterField that leaves the column as it was (new choices)."""
    if not isinstance(op, migrations.AlterField):
        return False
    state = loader.project_state(key, at_end=False)
    before = state.models[key[0], op.model_name_lower].fields[op.name]

    def column(field: models.Field[object, object]) -> tuple[object, ...]:
        _, path, args, kwargs = field.deconstruct()
        kept = {k: v for k, v in kwargs.items() if k not in _PYTHON_ONLY}
        return path, tuple(args), tuple(sorted(kept.items()))

    return column(before) == column(op.field)


def test_every_new_migration_leaves_the_previous_release_working():
    loader = MigrationLoader(None, ignore_no_migrations=True)
    checked = 0
    report = []
    for key, migration in sorted(loader.disk_migrations.items()):
        if key[0] not in APPS or key in BEFORE_THE_RULE or key in CONTRACTIONS:
            continue
        checked += 1
        operations = [op for op in migration.operations if not _only_python_side(loader, key, op)]
        report += [f"{key[0]}/{key[1]}: {p}" for p in problems(operations)]
    assert checked >= 1  # hosts 0008 at least: the rule is applied to something
    assert not report, "\n".join(report)


def test_the_rule_catches_what_would_break_a_running_server():
    bad = [
        migrations.AddField("host", "flag", models.BooleanField(default=False)),
        migrations.AddField("host", "label", models.CharField(max_length=10)),
        migrations.RemoveField("host", "agent_kind"),
        migrations.RenameField("host", "name", "hostname"),
        migrations.DeleteModel("MetricSample"),
    ]
    assert len(problems(bad)) == 5, problems(bad)
    good = [
        migrations.AddField("host", "flag", models.BooleanField(default=False, db_default=False)),
        migrations.AddField("host", "note", models.TextField(null=True)),
        migrations.AddField("host", "seen", models.DateTimeField(null=True, blank=True)),
        migrations.CreateModel("Thing", [("id", models.BigAutoField(primary_key=True))]),
    ]
    assert problems(good) == []
