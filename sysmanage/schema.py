"""OpenAPI schema extensions: the REST API's own authentication, described as the JWT
bearer scheme it is (drf-spectacular knows simplejwt's class, not its subclass)."""

from __future__ import annotations

from drf_spectacular.contrib.rest_framework_simplejwt import SimpleJWTScheme


# drf-spectacular registers extensions in an unannotated __init_subclass__.
class FingerprintJWTScheme(SimpleJWTScheme):  # type: ignore[no-untyped-call]
    """``sysmanage.credentials.FingerprintJWTAuthentication``: a bearer JWT."""

    target_class = "sysmanage.credentials.FingerprintJWTAuthentication"
