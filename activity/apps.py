"""App configuration of the activity app."""
from django.apps import AppConfig


class ActivityConfig(AppConfig):
    """User activity log."""

    name = "activity"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Connect the login and logout receivers of Django's auth signals."""
        from activity import receivers  # noqa: F401
