"""What ASHA saves: a grid with ASHA early stopping against the same grid run to completion.

    python bench/sweep_asha.py [--steps 24]

Both sweeps run on the tiny model in one run. It prints the total trial-steps of
each, the fraction ASHA saved, and whether both picked the same best
configuration (or how far apart their best eval losses are).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile


def run(scheduler: str, steps: int, folder: str) -> list[dict]:
    from raytune_it.config import load_config
    from raytune_it.tune.sweep import sweep

    space = {"train.learning_rate": [3e-3, 1e-3, 1e-5, 1e-7], "lora.rank": [4, 16]}
    config = load_config("tiny-sweep", [
        f"run.storage={folder}", f"run.name=asha-{scheduler}", f"tune.scheduler={scheduler}",
        f"tune.search_space={json.dumps(space)}", f"train.max_steps={steps}", "train.eval_every_steps=4",
        "tune.grace_period_steps=4", "train.micro_batch_size=4", "tune.max_concurrent_trials=1"])
    return sweep(config).rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="steps of a trial that runs to the end")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="raytune-it-asha-")
    try:
        full = run("none", args.steps, folder)
        asha = run("asha", args.steps, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def best(rows: list[dict]) -> dict:
        return min((r for r in rows if r["final_eval_loss"] is not None and r["status"] == "finished"),
                   key=lambda r: r["final_eval_loss"])

    full_steps, asha_steps = sum(r["steps"] for r in full), sum(r["steps"] for r in asha)
    print(f"\ngrid of {len(full)} trials, {args.steps} steps each at most")
    print(f"trial-steps without early stopping: {full_steps}")
    print(f"trial-steps with ASHA:              {asha_steps} "
          f"({sum(r['status'] == 'stopped early' for r in asha)} trials stopped early)")
    print(f"ASHA saved {1 - asha_steps / full_steps:.0%} of the trial-steps")
    keys = [k for k in full[0] if "." in k]
    b_full, b_asha = best(full), best(asha)
    same = all(b_full[k] == b_asha[k] for k in keys)
    print("same best configuration: " + ("yes" if same else "no") +
          f" ({', '.join(f'{k}={b_asha[k]}' for k in keys)}); best eval loss {b_full['final_eval_loss']:.4f} "
          f"(full grid) vs {b_asha['final_eval_loss']:.4f} (ASHA), difference "
          f"{abs(b_full['final_eval_loss'] - b_asha['final_eval_loss']):.4f}")


if __name__ == "__main__":
    main()
