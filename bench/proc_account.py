"""Who else used the CPU while a benchmark trained: cores and wake-ups per second of every process.

On a machine with few cores the training loop's compute threads share them with
everything else. Each time another process wakes up it takes a core from a
compute thread, and the other compute threads wait for it at their next
synchronization point. The count of wake-ups (voluntary context switches) says
more about that cost than CPU time does. Linux only: reads ``/proc`` itself,
because psutil's ``num_ctx_switches`` reads ``/proc/PID/status``, which counts
the main thread only, and Ray's processes do their waking in other threads.
"""

from __future__ import annotations

import collections
import os
import threading
import time

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _name(pid: str) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        parts = handle.read().decode(errors="replace").split("\0")
    if not parts[0]:  # a kernel thread
        with open(f"/proc/{pid}/comm") as handle:
            return f"[{handle.read().strip()}]"
    if parts[0].startswith("ray::"):
        return parts[0]
    if " (" in parts[0]:  # a retitled process, such as Ray's dashboard modules: "ray-dashboard-JobHead-0 (...)"
        return parts[0].split(" (")[0]
    if "-c" in parts[1:3]:  # python -c CODE
        return "python -c " + parts[parts.index("-c") + 1][:38]
    # Ray's native daemons and Python entry points: the program, then the script it runs.
    return " ".join(os.path.basename(part) for part in parts[:2] if part)[:50] or f"pid {pid}"


def _snapshot() -> dict[int, tuple[str, float, int]]:
    """pid -> (name, CPU seconds, voluntary context switches over all threads)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / _TICKS
            wakeups = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/status") as handle:
                    for line in handle:
                        if line.startswith("voluntary_ctxt_switches"):
                            wakeups += int(line.split()[1])
            out[int(pid)] = (_name(pid), cpu, wakeups)
        except (OSError, IndexError, ValueError):  # the process ended while we read it
            continue
    return out


class ProcessSampler:
    """Samples every process twice a second; ``table`` covers only the intervals in which training ran.

    An interval counts as training when some process used at least ``busy_cores``
    (the training process is the only one that does).
    """

    def __init__(self, busy_cores: float, interval_s: float = 0.5) -> None:
        self.busy_cores = busy_cores
        self.interval_s = interval_s
        self._samples: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProcessSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._samples.append((time.monotonic(), _snapshot()))
            self._stop.wait(self.interval_s)

    def totals(self) -> tuple[float, dict[str, list[float]]]:
        """Seconds of training, and name -> [processes, cores, wake-ups per second] over those seconds."""
        window, cpu, wakeups = 0.0, collections.Counter(), collections.Counter()
        pids: dict[str, set[int]] = collections.defaultdict(set)
        for (t0, before), (t1, after) in zip(self._samples, self._samples[1:]):
            common = [pid for pid in after if pid in before]
            if not common or max(after[p][1] - before[p][1] for p in common) < self.busy_cores * (t1 - t0):
                continue
            window += t1 - t0
            for pid in common:
                name = after[pid][0]
                cpu[name] += after[pid][1] - before[pid][1]
                wakeups[name] += after[pid][2] - before[pid][2]
                pids[name].add(pid)
        if not window:
            return 0.0, {}
        return window, {name: [len(pids[name]), cpu[name] / window, wakeups[name] / window] for name in cpu}

    def table(self, top: int = 12) -> str:
        window, rows = self.totals()
        if not rows:
            return "  (no training interval sampled)"
        lines = [f"  {'process':<52}{'count':>6}{'cores':>8}{'wake-ups/s':>12}"]
        ordered = sorted(rows.items(), key=lambda item: -item[1][2])
        for name, (count, cores, rate) in ordered[:top]:
            lines.append(f"  {name:<52}{count:>6}{cores:>8.3f}{rate:>12,.0f}")
        rest = ordered[top:]
        lines.append(f"  {'(all ' + str(len(ordered)) + ' process names)':<52}{sum(r[0] for _, r in ordered):>6}"
                     f"{sum(r[1] for _, r in ordered):>8.3f}{sum(r[2] for _, r in ordered):>12,.0f}")
        if rest:
            lines.insert(-1, f"  {'... ' + str(len(rest)) + ' more':<52}")
        lines.append(f"  over {window:.1f} s of training")
        return "\n".join(lines)
