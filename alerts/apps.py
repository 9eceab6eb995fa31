"""App configuration of the alerts app."""
from django.apps import AppConfig


class AlertsConfig(AppConfig):
    """Alerts about the fleet."""

    name = "alerts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Provide the fleet figures, which count hosts with alerts."""
        from alerts import selectors
        from sysmanage import topics

        topics.register_snapshot("fleet_status", selectors.fleet_stats)
