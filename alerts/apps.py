"""App configuration of the alerts app."""

from django.apps import AppConfig


class AlertsConfig(AppConfig):
    """Alerts about the fleet."""

    name = "alerts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Provide fleet figures and open alerts, judge metrics and host states, take alert
        commands."""
        # Imported here: these modules reach the models, which Django loads after the
        # app configs (not to break an import cycle).
        from django.conf import settings

        from alerts import commands, evaluation, selectors
        from alerts.models import AlertStatus
        from sysmanage import commands as command_registry
        from sysmanage import metrics, topics
        from sysmanage.events import listen
        from sysmanage.periodic import register_periodic

        topics.register_snapshot("fleet_status", selectors.fleet_snapshot)
        metrics.register_figures(
            "sysmanage_alerts_active",
            "Open or acknowledged alerts, by severity.",
            "severity",
            selectors.alert_severity_counts,
        )
        metrics.register_figures(
            "sysmanage_alerts_open",
            "Open alerts that nobody has acknowledged yet, by severity.",
            "severity",
            lambda: selectors.alert_severity_counts((AlertStatus.OPEN,)),
        )
        topics.register_snapshot("system_alerts", selectors.alert_snapshot)
        listen("host.metrics_reported", evaluation.on_metrics, blocking=False)
        listen("host.status_changed", evaluation.on_status)
        register_periodic(
            "alerts.rules", lambda: settings.ALERT_RULES_RELOAD_SECONDS, evaluation.reload_rules
        )
        register_periodic(
            "alerts.reboots",
            lambda: settings.ALERT_REBOOT_CHECK_SECONDS,
            evaluation.check_reboots,
        )
        register_periodic(
            "alerts.certificates",
            lambda: settings.ALERT_CERT_CHECK_SECONDS,
            evaluation.check_certificates,
        )
        command_registry.register("system_alerts", commands.handle_alert_command)
