"""
The SysManage agent's periodic upkeep: commands and package operations that no agent
connection took in time fail as not delivered, and registrations left waiting too long
expire.  Every server process runs it with the hosts sweep's period; it is safe to run
concurrently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hosts.smagent import deliveries, enrollment

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpiryReport:
    """What one run changed."""

    not_delivered: int
    registrations_expired: int


def expire() -> ExpiryReport:
    """Fail the work no connection took and expire old waiting registrations, once."""
    report = ExpiryReport(deliveries.expire_undelivered(), enrollment.registrations_expire())
    if report.not_delivered or report.registrations_expired:
        logger.info(
            "SysManage agents: %d command(s) or operation(s) not delivered, "
            "%d registration(s) expired",
            report.not_delivered,
            report.registrations_expired,
        )
    return report
