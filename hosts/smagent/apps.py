"""App configuration of the SysManage-agent protocol, an optional part of the hosts app.

Its models (registrations, registration keys, deliveries) stay in the ``hosts`` app and
its migrations; this app only plugs the protocol's behaviour into the core and into
``hosts`` from :meth:`SmagentConfig.ready`, so that neither ever names it.
"""

from django.apps import AppConfig


class SmagentConfig(AppConfig):
    """Serving the unchanged SysManage agent (``docs/sysmanage-agent.md``)."""

    name = "hosts.smagent"
    label = "smagent"
    verbose_name = "SysManage agent"

    def ready(self) -> None:
        """Register the delivery policy of SysManage-agent hosts, the expiry job and the
        agent's HTTP, REST and WebSocket routes."""
        # Imported here: these modules reach the models, which Django loads after the
        # app configs (not to break an import cycle).
        from django.conf import settings

        from hosts import delivery
        from hosts.models import AgentKind
        from hosts.smagent import deliveries, maintenance
        from sysmanage import plugins
        from sysmanage.periodic import register_periodic

        delivery.register(AgentKind.SYSMANAGE, deliveries.POLICY)
        register_periodic(
            "smagent.expire", lambda: settings.MAINTENANCE_SWEEP_SECONDS, maintenance.expire
        )
        plugins.register_urls("hosts.smagent.urls")
        plugins.register_websocket_routes("hosts.smagent.routing")
