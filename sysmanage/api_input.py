"""
What the REST API accepts: query filters checked by a serializer, JSON bodies of bounded
depth, and errors that always carry a ``detail`` sentence.

Malformed input is the client's mistake and gets 400 with words, never a server error:
every list endpoint validates its filters here before they reach a query.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import IO, Any

from django.conf import settings
from rest_framework import serializers
from rest_framework.exceptions import APIException, ParseError, ValidationError
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import exception_handler


class InvalidQuery(APIException):
    """A query parameter that does not hold what its filter needs (400)."""

    status_code = 400
    default_code = "invalid_query"
    default_detail = "Invalid query parameters."


def _summary(errors: object) -> str:
    """``field: message; field: message`` from a serializer's errors."""
    if isinstance(errors, dict):
        return "; ".join(f"{field}: {_summary(value)}" for field, value in errors.items())
    if isinstance(errors, list):
        return " ".join(_summary(item) for item in errors)
    return str(errors)


def query_filters(request: Request, filters: type[serializers.Serializer[Any]]) -> dict[str, Any]:
    """The validated values of ``filters``' fields among the query parameters.

    An empty parameter means no filter; parameters the serializer does not name are
    left to others (pagination, format).  Anything invalid raises :class:`InvalidQuery`.
    """
    names = filters().fields.keys()
    data = {
        name: value for name, value in request.query_params.items() if name in names and value != ""
    }
    checked = filters(data=data)
    if not checked.is_valid():
        raise InvalidQuery(
            {
                "detail": f"Invalid query parameters: {_summary(checked.errors)}",
                "errors": checked.errors,
            }
        )
    return dict(checked.validated_data)


class CsvChoiceField(serializers.Field[list[str], object, str, Any]):
    """Comma-separated values, each one of ``choices``: ``?severity=warning,critical``."""

    def __init__(self, *, choices: Iterable[tuple[str, object]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.choices = [value for value, _label in choices]

    def to_internal_value(self, data: object) -> list[str]:
        """The listed values, each checked."""
        values = [v.strip() for v in str(data).split(",") if v.strip()]
        unknown = [v for v in values if v not in self.choices]
        if unknown:
            raise ValidationError(
                f"{', '.join(unknown)[:200]} is not one of {', '.join(self.choices)}"
            )
        return values

    def to_representation(self, value: list[str]) -> str:
        """Back to the comma-separated form."""
        return ",".join(value)


def _depth_exceeds(value: object, limit: int) -> bool:
    """Whether ``value`` nests lists and objects deeper than ``limit`` (iteratively)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser, refusing (400) bodies nested deeper than
    ``API_MAX_JSON_DEPTH``: deep nesting costs recursion, and before this a body nested
    a few thousand levels deep was a server error."""

    def parse(
        self,
        stream: IO[Any],
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        """Parse, then measure the depth."""
        limit = settings.API_MAX_JSON_DEPTH
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON nested deeper than {limit} levels") from None
        if _depth_exceeds(data, limit):
            raise ParseError(f"JSON nested deeper than {limit} levels")
        return data


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, making sure every error body has a ``detail`` sentence: field
    errors keep their keys and gain a ``detail`` that sums them up."""
    response = exception_handler(exc, context)
    if response is None or not isinstance(exc, ValidationError):
        return response
    if isinstance(response.data, dict) and "detail" not in response.data:
        response.data = {"detail": f"Invalid input: {_summary(response.data)}", **response.data}
    elif isinstance(response.data, list):
        response.data = {
            "detail": f"Invalid input: {_summary(response.data)}",
            "errors": response.data,
        }
    return response
