"""App configuration of the core package."""

from django.apps import AppConfig


class SysmanageConfig(AppConfig):
    """Core app: the user model and the WebSocket protocol core."""

    name = "sysmanage"
    verbose_name = "SysManage"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Connect the revocation receivers, the recheck of open sockets, the pruning of
        spent refresh tokens' reuse grace, the all-hosts summaries, the OpenAPI
        description of the authentication, and the JWT backend that also verifies with
        the former secret keys."""
        # Imported here: these modules reach the models, which Django loads after the
        # app configs (not to break an import cycle).
        from django.conf import settings

        from sysmanage import (
            control,
            fleet,
            hub,
            receivers,  # noqa: F401
            recheck,
            schema,  # noqa: F401 - registers the OpenAPI description of the authentication
            secretkeys,
            services,
            summary,
        )
        from sysmanage.periodic import register_periodic

        secretkeys.token_backend_install()
        if fleet.on_figures_changed not in hub.FIGURES_LISTENERS:
            hub.FIGURES_LISTENERS.append(fleet.on_figures_changed)

        register_periodic(
            "sysmanage.socket_recheck",
            lambda: settings.WS_RECHECK_SECONDS,
            recheck.periodic_recheck,
        )
        register_periodic(
            "sysmanage.refresh_rotations_prune",
            lambda: max(60.0, float(settings.JWT_REFRESH_REUSE_GRACE_SECONDS)),
            services.refresh_rotations_prune,
        )
        register_periodic(
            "sysmanage.fleet_metrics",
            lambda: settings.WS_FLEET_METRICS_INTERVAL,
            summary.send_summaries,
        )
        control.register(control.RecheckUsers, recheck.on_recheck_users)
