"""The REST API's one pagination: ``?limit=`` and ``?offset=``, with a cap.

A page holds at most ``API_MAX_PAGE_SIZE`` items whatever ``?limit=`` asks (before the
cap, ``?limit=100000`` answered 165 MiB and four such requests took a server to 3 GB).
``limit`` and ``offset`` that are not non-negative integers get 400 instead of being
ignored, and offsets beyond any database's range are refused instead of failing there.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request
from rest_framework.views import APIView

#: Larger offsets overflow SQLite's and PostgreSQL's 64-bit OFFSET (a server error).
MAX_OFFSET = 10**12


def _non_negative(request: Request, name: str, upper: int) -> int | None:
    """The integer query parameter ``name`` (None when absent or empty); 400 unless it
    is a whole number from 0 to ``upper``."""
    raw = request.query_params.get(name, "")
    if raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 15 or int(raw) > upper:
        raise ValidationError(
            {
                "detail": f"{name} must be a whole number from 0 to {upper}",
                name: [f"must be a whole number from 0 to {upper}"],
            }
        )
    return int(raw)


class CappedLimitOffsetPagination(LimitOffsetPagination):
    """``LimitOffsetPagination`` with ``max_limit`` from the settings and strict
    parameters."""

    @property
    def max_limit(self) -> int:  # type: ignore[override]
        """The cap, read when used (tests change the setting)."""
        return int(settings.API_MAX_PAGE_SIZE)

    def get_limit(self, request: Request) -> int:
        """``?limit=``, capped; the default page size without one.  ``0`` means the
        default too, as in DRF."""
        limit = _non_negative(request, self.limit_query_param, 10**15 - 1)
        if not limit:
            # REST_FRAMEWORK["PAGE_SIZE"]; without one, a page is as long as allowed
            return self.max_limit if self.default_limit is None else self.default_limit
        return min(limit, self.max_limit)

    def get_offset(self, request: Request) -> int:
        """``?offset=``, 0 without one."""
        return _non_negative(request, self.offset_query_param, MAX_OFFSET) or 0

    def get_schema_operation_parameters(self, view: APIView) -> list[dict[str, Any]]:
        """DRF's parameters, with the cap stated."""
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.limit_query_param:
                parameter["description"] += f" At most {self.max_limit}."
                parameter["schema"]["maximum"] = self.max_limit
        return parameters
