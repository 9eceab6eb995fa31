"""App configuration of the hosts app."""

from django.apps import AppConfig


class HostsConfig(AppConfig):
    """Managed hosts and what runs on them."""

    name = "hosts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Plug the hosts app into the protocol core: snapshots, filter checks, commands."""
        # Imported here: these modules reach the models, which Django loads after the
        # app configs (not to break an import cycle).
        from django.conf import settings

        from hosts import (  # noqa: F401 - receivers: signals
            commands,
            fleetrunner,
            maintenance,
            receivers,
            selectors,
        )
        from hosts.events import AgentTook, CommandFinished, PackageOperationFinished
        from sysmanage import commands as command_registry
        from sysmanage import control, metrics, permissions, topics
        from sysmanage.periodic import register_periodic

        permissions.register_granted_hosts(selectors.granted_host_ids)
        topics.register_snapshot("host_status", selectors.host_status_snapshot)
        metrics.register_figures(
            "sysmanage_hosts", "Hosts, by status.", "status", selectors.host_status_counts
        )
        topics.register_snapshot("command_execution", selectors.command_snapshot)
        topics.register_snapshot("package_operations", selectors.operation_snapshot)
        topics.register_filter_check("host_id", selectors.host_id_problem)
        topics.register_filter_check("run_id", selectors.fleet_run_id_problem)
        command_registry.register("command_execution", fleetrunner.handle_command)
        command_registry.register("package_operations", fleetrunner.handle_package_operation)
        control.register(AgentTook, commands.on_agent_took)
        control.register(CommandFinished, commands.on_command_finished)
        control.register(PackageOperationFinished, commands.on_package_operation_finished)
        register_periodic(
            "hosts.sweep", lambda: settings.MAINTENANCE_SWEEP_SECONDS, maintenance.periodic_sweep
        )
        register_periodic(
            "hosts.agent_recheck", lambda: settings.AGENT_RECHECK_SECONDS, maintenance.agent_recheck
        )
