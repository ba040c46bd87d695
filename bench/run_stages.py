"""Stage times of `raytune-it run` on the default tiny-run preset, against its 5-minute budget.

    python bench/run_stages.py [--fresh] [KEY=VALUE ...]

Runs the whole job in a temporary folder, then prints each stage's wall seconds,
its share of the total, and the total against the 300 s budget (these machines
are noisy: the shares say where the time goes better than the seconds do).
``--fresh`` runs it as a new install does: with an empty raytune-it cache (the
tiny model and the data are built again) and an empty torch extensions folder
(nothing compiled before).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 300


def main() -> None:
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(__doc__)
        return
    args = [arg for arg in sys.argv[1:] if arg != "--fresh"]
    storage = Path(tempfile.mkdtemp(prefix="raytune-it-run-bench-"))
    env = dict(os.environ)
    if "--fresh" in sys.argv[1:]:
        env.update(RAYTUNE_IT_CACHE=str(storage / "cache"), TORCH_EXTENSIONS_DIR=str(storage / "torch_extensions"))
    try:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "raytune_it", "run", "tiny-run", f"run.storage={storage}", *args],
                       check=True, stdout=subprocess.DEVNULL, env=env)
        wall = time.perf_counter() - started
        stages = json.loads((storage / "tiny-run" / "stages.json").read_text())["seconds"]
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    total = sum(stages.values())
    print(f"{'stage':<16}{'seconds':>10}{'share':>8}")
    for name, seconds in stages.items():
        print(f"{name:<16}{seconds:>10.1f}{seconds / total:>8.0%}")
    print(f"{'stages':<16}{total:>10.1f}")
    print(f"{'command wall':<16}{wall:>10.1f}   ({wall / BUDGET_S:.2f}x of the {BUDGET_S} s budget; the rest is "
          "Ray start-up, the report and shutdown)")


if __name__ == "__main__":
    main()
