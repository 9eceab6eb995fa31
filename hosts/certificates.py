"""
Certificates found on a host: the SysManage agent's ``host_certificates_update`` turned
into rows to store.

The agent reads the certificate files it finds (the distribution's trust store, and
``/etc/ssl``, ``/etc/pki``, web server folders...) and reports each one; every file
appears twice in one report, so rows are deduplicated by ``file_path``.  Entries that are
not objects, or have no path, are skipped; any other field of the wrong type is read as
absent.  At most :data:`MAX_STORED_CERTIFICATES` are kept per host, the ones that are not
CA certificates first.  Nothing here touches the database (see
:func:`hosts.services.host_certificates_save`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

#: The most certificates stored per host; the rest of a larger report is dropped (logged).
MAX_STORED_CERTIFICATES = 2000
PATH_LIMIT, DN_LIMIT, NAME_LIMIT = 1024, 1024, 255
SERIAL_LIMIT, FINGERPRINT_LIMIT, USAGE_LIMIT = 128, 128, 100
#: The longest ``Alert.rule_key``.
KEY_LIMIT = 255


@dataclass(frozen=True)
class Certificate:
    """One certificate file as stored."""

    file_path: str
    name: str
    subject: str
    issuer: str
    serial_number: str
    fingerprint_sha256: str
    not_before: datetime | None
    not_after: datetime | None
    is_ca: bool
    key_usage: str


@dataclass(frozen=True)
class CertificateReport:
    """A report's certificates (deduplicated, bounded), and how many distinct files it
    named before the bound (``distinct`` > ``len(certificates)``: some were dropped)."""

    certificates: list[Certificate]
    distinct: int
    skipped: int

    @property
    def dropped(self) -> int:
        """Distinct certificates left out by the bound."""
        return self.distinct - len(self.certificates)


def _text(value: object, limit: int) -> str:
    if not isinstance(value, str):
        return ""
    return value.replace("\x00", "").strip()[:limit]


def _when(value: object) -> datetime | None:
    """An ISO 8601 time (UTC when it names no zone); None when absent or unreadable."""
    if not isinstance(value, str) or not value or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


def _flag(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return value is True


_QUOTED_SPLIT = re.compile(r',(?=(?:[^"]*"[^"]*")*[^"]*$)')


def common_name(subject: str) -> str:
    """The last ``CN`` of a distinguished name, in OpenSSL's one-line form
    (``C = FR, O = X, CN = Name``), its legacy form (``/C=FR/CN=Name``) or RFC 4514's
    (``CN=Name,O=X``); empty when it has none."""
    parts = subject.split("/") if subject.startswith("/") else _QUOTED_SPLIT.split(subject)
    found = ""
    for part in parts:
        attribute, sep, value = part.partition("=")
        if sep and attribute.strip().upper() == "CN":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            found = value.strip() or found
    return found


def _certificate(item: Mapping[str, object]) -> Certificate | None:
    path = _text(item.get("file_path"), PATH_LIMIT + 1)
    if not path or len(path) > PATH_LIMIT:
        return None
    subject = _text(item.get("subject"), DN_LIMIT)
    name = _text(item.get("certificate_name"), NAME_LIMIT) or common_name(subject)[:NAME_LIMIT]
    return Certificate(
        file_path=path,
        name=name or path.rsplit("/", 1)[-1][:NAME_LIMIT],
        subject=subject,
        issuer=_text(item.get("issuer"), DN_LIMIT),
        serial_number=_text(item.get("serial_number"), SERIAL_LIMIT),
        fingerprint_sha256=_text(item.get("fingerprint_sha256"), FINGERPRINT_LIMIT).lower(),
        not_before=_when(item.get("not_before")),
        not_after=_when(item.get("not_after")),
        is_ca=_flag(item.get("is_ca")),
        key_usage=_text(item.get("key_usage"), USAGE_LIMIT),
    )


def certificates_from_sysmanage(
    data: Mapping[str, object], limit: int = MAX_STORED_CERTIFICATES
) -> CertificateReport | None:
    """A ``host_certificates_update``'s ``certificates`` (None when it carries no list:
    such a report changes nothing).  The first entry of each ``file_path`` is kept; the
    certificates that are not CA certificates come first, then by path."""
    listed = data.get("certificates")
    if not isinstance(listed, list):
        return None
    seen: dict[str, Certificate] = {}
    skipped = 0
    for item in listed:
        row = _certificate(item) if isinstance(item, dict) else None
        if row is None:
            skipped += 1
        elif row.file_path not in seen:
            seen[row.file_path] = row
    rows = sorted(seen.values(), key=lambda c: (c.is_ca, c.file_path))
    return CertificateReport(rows[: max(0, limit)], len(rows), skipped)


def alert_key(file_path: str) -> str:
    """The alert key of a certificate file: its path, or for a path too long for a key,
    its start and a digest of the whole."""
    if len(file_path) <= KEY_LIMIT:
        return file_path
    digest = hashlib.sha256(file_path.encode("utf-8", "replace")).hexdigest()[:16]
    return f"{file_path[: KEY_LIMIT - 18]}…#{digest}"


def days_left(not_after: datetime, now: datetime) -> float:
    """Days from ``now`` until ``not_after`` (negative once expired)."""
    return (not_after - now).total_seconds() / 86400
