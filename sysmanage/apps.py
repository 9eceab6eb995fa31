"""App configuration of the core package."""
from django.apps import AppConfig


class SysmanageConfig(AppConfig):
    """Core app: the user model and the WebSocket protocol core."""

    name = "sysmanage"
    verbose_name = "SysManage"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Connect the session-revocation receivers once the models are loaded."""
        from sysmanage import receivers  # noqa: F401
