"""App configuration of the activity app."""

from django.apps import AppConfig


class ActivityConfig(AppConfig):
    """User activity log."""

    name = "activity"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Connect the auth-signal receivers and take audit records from lower apps."""
        from activity import receivers  # noqa: F401
        from activity.services import activity_record
        from sysmanage.audit import register_sink

        register_sink(activity_record)
