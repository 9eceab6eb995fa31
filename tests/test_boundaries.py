"""The SysManage-agent protocol plugs into hosts; hosts never imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = "hosts.smagent"


def imported_names(path: Path, root: Path = ROOT) -> set[str]:
    """Every module, and every ``module.name``, that the file at ``path`` imports
    (relative imports resolved against its package under ``root``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):  # function-level imports too
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def forbidden(names: set[str]) -> list[str]:
    return sorted(n for n in names if n == FORBIDDEN or n.startswith(FORBIDDEN + "."))


@pytest.mark.parametrize(
    "source",
    [
        "import hosts.smagent.protocol",
        "from hosts import smagent",
        "from hosts.smagent.enrollment import EnrollmentRefused",
        "from .smagent import deliveries",
        "def f():\n    from hosts.smagent import views\n",
    ],
)
def test_the_check_sees_every_form_of_import(tmp_path, source):
    module = tmp_path / "hosts" / "sample.py"
    module.parent.mkdir()
    module.write_text(source)
    assert forbidden(imported_names(module, tmp_path))


def test_hosts_imports_nothing_of_the_sysmanage_agent():
    smagent = ROOT / "hosts" / "smagent"
    modules = [p for p in (ROOT / "hosts").rglob("*.py") if smagent not in p.parents]
    assert len(modules) > 20
    offending = {
        str(path.relative_to(ROOT)): names
        for path in modules
        if (names := forbidden(imported_names(path)))
    }
    assert offending == {}


def test_the_sysmanage_agent_app_registers_its_delivery_policy_and_expiry_job():
    from hosts import delivery
    from hosts.models import AgentKind
    from hosts.smagent import deliveries, maintenance
    from sysmanage import periodic

    assert delivery.policy_for(AgentKind.SYSMANAGE) is deliveries.POLICY
    assert delivery.policy_for(AgentKind.NATIVE) is delivery.CONNECTED_AGENT
    with pytest.raises(ValueError, match="registered already"):
        delivery.register(AgentKind.SYSMANAGE, delivery.CONNECTED_AGENT)
    jobs = {job.name: job.job for job in periodic.registered()}
    assert jobs["smagent.expire"] is maintenance.expire


#: Each app and the higher apps it must never import (``docs/architecture.md``):
#: sysmanage ◄── hosts ◄── alerts ◄── activity.
LAYERS = {
    "sysmanage": ("hosts", "alerts", "activity"),
    "hosts": ("alerts", "activity"),
    "alerts": ("activity",),
}
#: The modules that assemble the site from every app's routes.
SITE_ASSEMBLY = {"sysmanage/urls.py", "sysmanage/routing.py"}


@pytest.mark.parametrize("app", sorted(LAYERS))
def test_lower_apps_never_import_higher_ones(app):
    higher = LAYERS[app]
    offending = {}
    for path in (ROOT / app).rglob("*.py"):
        relative = str(path.relative_to(ROOT))
        if "migrations" in path.parts or relative in SITE_ASSEMBLY:
            continue
        names = sorted(
            n for n in imported_names(path) if any(n == h or n.startswith(h + ".") for h in higher)
        )
        if names:
            offending[relative] = names
    assert offending == {}
