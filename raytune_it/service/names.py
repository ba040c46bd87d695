"""The name a fine-tuned model is served by, in OpenAI's shape: ``ft:<base>:<organization>:<suffix>:<job id>``.

The name carries the job id, so the app finds the adapter (``runs/<job id>/export``) without a registry,
and the organization, which the ingress checks against the caller's before anything is looked up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
_FINE_TUNED = re.compile(
    r"^ft:(?P<base>[^:]+):(?P<organization>[^:]+):(?P<suffix>[^:]*):(?P<job_id>ftjob-[0-9a-f]{24})$")


@dataclass(frozen=True)
class FineTunedName:
    base: str
    organization: str
    suffix: str
    job_id: str

    def __str__(self) -> str:
        return f"ft:{self.base}:{self.organization}:{self.suffix}:{self.job_id}"


def parse_fine_tuned(name: str) -> FineTunedName | None:
    match = _FINE_TUNED.match(name)
    return FineTunedName(**match.groupdict()) if match else None
