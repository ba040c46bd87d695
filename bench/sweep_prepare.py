"""A sweep's data preparation: every trial tokenizing its own copy (what each trial did before datasets were
shared) against the sweep preparing once before its trials (``tune.sweep.prepare_trial_data``), in one run.

    python bench/sweep_prepare.py [--records 20000] [--trials 4] [--real FILE]

Both sides use the real code on the same data and a ``tiny-sweep`` grid of ``--trials`` trials (LoRA ranks
and batch sizes, which leave the rows alone): "per trial" prepares each trial's config into a prepared root
of its own (nothing shared, so each tokenizes), "once" runs the sweep's own preparation step into one
shared root (the first trial's dataset is tokenized, the others find it by its key). No Ray is needed for
either. It prints the seconds of each and ends with a line of the form ``sweep-prepare per-trial/once: 3.60x``.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path


def trials_for(data: str, root: str, count: int) -> tuple:
    from raytune_it.config import load_config
    from raytune_it.tune.space import expand_trials

    ranks = [4, 8, 16, 32, 64, 128][: max(1, (count + 1) // 2)]
    space = f'tune.search_space={{"lora.rank": {ranks}, "train.micro_batch_size": [2, 4]}}'
    config = load_config("tiny-sweep", [f"data.path={data}", f"run.storage={root}", space])
    return config, expand_trials(config)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000, help="generated records to tokenize")
    parser.add_argument("--trials", type=int, default=4, help="trials in the sweep")
    parser.add_argument("--real", type=Path, help="a real Alpaca-format file instead of generated records")
    args = parser.parse_args()

    from rich.console import Console

    from raytune_it.config.loading import with_overrides
    from raytune_it.data.synthetic import generate, write_jsonl
    from raytune_it.models.loading import load_tokenizer
    from raytune_it.train.prepared import prepare
    from raytune_it.tune.sweep import prepare_trial_data

    scratch = Path(tempfile.mkdtemp(prefix="sweep-prepare-"))
    data = args.real or write_jsonl(generate(args.records, seed=11), scratch / "records.jsonl")

    _, trials = trials_for(str(data), str(scratch / "per-trial"), args.trials)
    started = time.perf_counter()
    for number, trial in enumerate(trials):  # each trial on its own, as before: a root of its own
        own = with_overrides(trial.config, {"data.prepared_root": str(scratch / f"trial-{number}")})
        model = own.model
        prepare(own, load_tokenizer(model.name_or_path, revision=model.revision))
    per_trial = time.perf_counter() - started

    config, trials = trials_for(str(data), str(scratch / "once"), args.trials)
    started = time.perf_counter()
    prepare_trial_data(config, trials, Console(file=io.StringIO()))
    once = time.perf_counter() - started

    print(f"{len(trials)} trials on {data} ({'real' if args.real else f'{args.records:,} generated records'})")
    print(f"  per trial (each tokenizes its own copy): {per_trial:7.2f} s")
    print(f"  once (the sweep prepares, trials reuse): {once:7.2f} s")
    print(f"sweep-prepare per-trial/once: {per_trial / once:.2f}x")


if __name__ == "__main__":
    main()
