"""The driver's view of a run: a live progress line, and every step's metrics kept.

Rank 0 puts each step's metrics on a Ray queue; a driver thread drains it while
``trainer.fit()`` blocks, shows step, epoch, loss, tokens/s and ETA (a live bar on
a terminal, a plain line every few steps in ``ray job`` logs), and keeps every
step in ``metrics.jsonl`` in the run folder. Object stores cannot append, so the
file is rewritten whole: at every eval step (so it always covers the latest
checkpoint), every few seconds otherwise, and at the end; each flush also hands
the new steps to the experiment tracker, if any.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

from raytune_it.train.step_metrics import eta_seconds, step_eval_loss

FLUSH_EVERY_S = 5.0


class ProgressMonitor:
    def __init__(self, queue: Any, total_steps: int, metrics_path: Any, console: Any = None,
                 on_steps: Callable[[list[dict]], None] | None = None) -> None:
        from rich.console import Console

        self.queue = queue
        self.on_steps = on_steps  # an experiment tracker's, given new steps at each flush
        self._tracked = 0
        self.total_steps = total_steps
        self.metrics_path = metrics_path  # a storage Location
        self.console = console or Console(stderr=False)
        self.history: list[dict] = []
        # What an earlier attempt of this run wrote stays first: a resumed run adds to it.
        self._lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
        self._written = len(self._lines)
        self._last_flush = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raytune-it-progress", daemon=True)

    def __enter__(self) -> "ProgressMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._drain()
        self._flush()

    def _drain(self) -> list[dict]:
        try:
            waiting = self.queue.qsize()
            items = self.queue.get_nowait_batch(waiting) if waiting else []
        except Exception:  # the queue actor is gone (cluster shutting down): nothing more will come
            return []
        if items:
            self._lines.extend(json.dumps(item) for item in items)
            self.history.extend(items)
            if any("eval_loss" in item for item in items) or time.monotonic() - self._last_flush > FLUSH_EVERY_S:
                self._flush()
        return items

    def _flush(self) -> None:
        if self.on_steps is not None and len(self.history) > self._tracked:
            self.on_steps(self.history[self._tracked:])
            self._tracked = len(self.history)
        if len(self._lines) == self._written:
            return
        try:
            self.metrics_path.write_text("".join(line + "\n" for line in self._lines))
        except OSError as exc:  # storage briefly unreachable: keep the lines, try again at the next flush
            self.console.print(f"warning: could not write {self.metrics_path.uri}: {exc}", style="yellow",
                               markup=False, highlight=False)
            return
        self._written, self._last_flush = len(self._lines), time.monotonic()

    def _line(self, m: dict) -> str:
        done = m["step"] / max(1, m["total_steps"])
        side = m.get("eval_seconds", 0.0) + m.get("checkpoint_seconds", 0.0)
        eta = eta_seconds(m)
        eval_loss = step_eval_loss(m)
        eval_text = f" eval_loss {eval_loss:.4f}" if eval_loss is not None else ""
        # tokens/s is the training rate: evaluation and checkpoint time is shown apart, never folded into it.
        return (f"step {m['step']}/{m['total_steps']} ({done:.0%}) epoch {m['epoch']} loss {m['loss']:.4f}"
                f"{eval_text} lr {m['learning_rate']:.2e} tokens/s {m['tokens_per_second']:,.0f} "
                f"(train {m['train_seconds']:.0f} s, eval+ckpt {side:.0f} s) ETA {int(eta) // 60}:{int(eta) % 60:02d}")

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
