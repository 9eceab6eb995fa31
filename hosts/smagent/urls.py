"""HTTP routes of the SysManage agent (``docs/sysmanage-agent.md``): the endpoints the
agent calls, and the REST API of its enrollment.  Registered with
``sysmanage.plugins.register_urls`` from the app's ``ready()``."""

from django.urls import path

from hosts.smagent import api, views
from sysmanage.plugins import ApiRoute

#: On the REST API's router (``/api/<prefix>/``).
api_routes: list[ApiRoute] = [
    ("registrations", api.AgentRegistrationViewSet, "registration"),
    ("registration-keys", api.RegistrationKeyViewSet, "registration-key"),
]

urlpatterns = [
    path("api/host/register", views.register, name="sysmanage-agent-register"),
    path("api/agent/auth", views.auth, name="sysmanage-agent-auth"),
    path("api/agent/poll", views.poll, name="sysmanage-agent-poll"),
    path(
        "api/hosts/<uuid:pk>/allow-reregistration/",
        api.HostReregistrationViewSet.as_view({"post": "allow_reregistration"}),
        name="host-allow-reregistration",
    ),
]
