"""The driver's view of a run: a live progress line, and every step's metrics kept.

Rank 0 puts each step's metrics on a Ray queue; a driver thread drains it while
``trainer.fit()`` blocks, shows step, epoch, loss, tokens/s and ETA (a live bar on
a terminal, a plain line every few steps in ``ray job`` logs), and appends each
step to ``metrics.jsonl`` in the run folder.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any


class ProgressMonitor:
    def __init__(self, queue: Any, total_steps: int, metrics_path: Path, console: Any = None) -> None:
        from rich.console import Console

        self.queue = queue
        self.total_steps = total_steps
        self.metrics_path = metrics_path
        self.console = console or Console(stderr=False)
        self.history: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raytune-it-progress", daemon=True)

    def __enter__(self) -> "ProgressMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._drain()

    def _drain(self) -> list[dict]:
        try:
            waiting = self.queue.qsize()
            items = self.queue.get_nowait_batch(waiting) if waiting else []
        except Exception:  # the queue actor is gone (cluster shutting down): nothing more will come
            return []
        if items:
            with self.metrics_path.open("a", encoding="utf-8") as handle:
                for item in items:
                    handle.write(json.dumps(item) + "\n")
            self.history.extend(items)
        return items

    def _line(self, m: dict) -> str:
        done = m["step"] / max(1, m["total_steps"])
        rate = m["train_seconds"] / max(1, m["step"])
        eta = rate * (m["total_steps"] - m["step"])
        eval_text = f" eval_loss {m['eval_loss']:.4f}" if "eval_loss" in m and not math.isnan(m["eval_loss"]) else ""
        return (f"step {m['step']}/{m['total_steps']} ({done:.0%}) epoch {m['epoch']} loss {m['loss']:.4f}"
                f"{eval_text} lr {m['learning_rate']:.2e} tokens/s {m['tokens_per_second']:,.0f} "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")

    def _run(self) -> None:
        every = max(1, self.total_steps // 20)
        if self.console.is_terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("[bold]training"), BarColumn(), TextColumn("{task.description}"),
                          TimeElapsedColumn(), console=self.console, transient=False) as bar:
                task = bar.add_task("starting workers", total=self.total_steps)
                while not self._stop.wait(0.5):
                    for item in self._drain():
                        bar.update(task, completed=item["step"], description=self._line(item))
            return
        while not self._stop.wait(1.0):
            for item in self._drain():
                if item["step"] % every == 0 or item["step"] == item["total_steps"] or "eval_loss" in item:
                    self.console.print(self._line(item), markup=False, highlight=False)
