"""Which checkpoint a run resumes from: the newest one Ray Train recorded.

Ray Train records a checkpoint once every worker has reported it (each ZeRO-3 rank uploads its own shard),
in ``checkpoints/checkpoint_manager_snapshot.json``. A ``step_*`` folder whose upload began but was not
recorded, because a worker died in between, is incomplete, and a restart uses the recorded one before it.
"""

from __future__ import annotations

import json
from typing import Any

SNAPSHOT = "checkpoint_manager_snapshot.json"


def latest_checkpoint_step(run_dir: Any) -> int | None:
    """The step of the newest recorded checkpoint of a run folder (a storage Location), if any."""
    snapshot = run_dir / "checkpoints" / SNAPSHOT
    if not snapshot.is_file():
        return None
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (json.JSONDecodeError, OSError):  # being rewritten
        return None
    return latest["metrics"]["step"] if latest else None
