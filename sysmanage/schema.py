"""OpenAPI schema extensions: the REST API's own authentication, described as the JWT
bearer scheme it is (drf-spectacular knows simplejwt's class, not its subclass)."""

from __future__ import annotations

from drf_spectacular.contrib.rest_framework_simplejwt import SimpleJWTScheme


class FingerprintJWTScheme(SimpleJWTScheme):
    """``sysmanage.credentials.FingerprintJWTAuthentication``: a bearer JWT."""

    target_class = "sysmanage.credentials.FingerprintJWTAuthentication"
