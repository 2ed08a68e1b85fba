"""What a training run writes and shows: per-epoch metrics (metrics.csv, one row per
epoch, and metrics.json, the whole history) and the progress bar."""

from __future__ import annotations

import csv
import json
import os
import sys
import time


def write_metrics(out_dir: str, history: list[dict]) -> None:
    """metrics.csv and metrics.json written anew from ``history`` (a resumed run: the rows as of
    its checkpoint)."""
    path = os.path.join(out_dir, "metrics.csv")
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        if history:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    os.replace(tmp, path)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(history, f, indent=1)


def append_metrics(out_dir: str, record: dict, history: list[dict]) -> None:
    """Append ``record`` to metrics.csv (header first) and rewrite metrics.json with ``history``."""
    path = os.path.join(out_dir, "metrics.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(record))
        if new:
            writer.writeheader()
        writer.writerow(record)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(history, f, indent=1)


class Progress:
    """Progress over ``total`` items on stderr.

    ``enabled``: a tqdm bar on a terminal; in a log file (stderr not a terminal) a plain
    line at most every ``interval`` seconds and one at the end, instead of thousands of
    carriage-return updates. Not enabled: nothing, or with ``estimate=True`` (long jobs
    run with --no-progress) one line after the first item saying how long the rest may take.
    """

    def __init__(self, enabled: bool, total: int, desc: str, interval: float = 30.0, estimate: bool = False,
                 estimate_above: float = 0.0, first_estimate: bool = False):
        self.total, self.desc, self.interval = total, desc, interval
        self.done, self.postfix = 0, {}
        self.first_estimate = first_estimate  # lines mode: also a line after the first item, with the time left
        self.estimate_above = estimate_above  # estimate mode: no line where the rest takes less (seconds)
        self.start = self.last_line = time.monotonic()
        self.bar = None
        self.mode = None
        if enabled and total > 0:
            self.mode = "lines"
            if sys.stderr.isatty():
                try:
                    from tqdm import tqdm
                except ImportError:  # an optional dependency: plain lines instead
                    pass
                else:
                    self.mode = "bar"
                    self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
        elif estimate and total > 1:
            self.mode = "estimate"

    def update(self, **postfix) -> None:
        self.done += 1
        self.postfix = postfix
        if self.mode == "bar":
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(**postfix)
            return
        now = time.monotonic()
        if self.mode == "lines" and self.done == 1 and self.first_estimate and self.total > 1:
            self.last_line = now
            self._line(f"1/{self.total} took {now - self.start:.1f} s; the rest may take about "
                       f"{_duration((now - self.start) * (self.total - 1))}")
        elif self.mode == "lines" and (now - self.last_line >= self.interval or self.done == self.total):
            self.last_line = now
            rate = self.done / max(now - self.start, 1e-9)
            self._line(f"{self.done}/{self.total}, {rate:.3g}/s, about {_duration((self.total - self.done) / rate)} "
                       "left" if self.done < self.total else f"{self.done}/{self.total}")
        elif self.mode == "estimate" and self.done == 1:
            left = (now - self.start) * (self.total - 1)
            if left < self.estimate_above:
                return
            self._line(f"1/{self.total} took {now - self.start:.1f} s; the rest may take about {_duration(left)}")

    def beat(self, fraction: float) -> None:
        """Within a long item: in lines mode, a line where the interval has passed since the last
        (an item of a paper-sized model's evaluation can take minutes)."""
        now = time.monotonic()
        if self.mode == "lines" and now - self.last_line >= self.interval:
            self.last_line = now
            self._line(f"{self.done}/{self.total}, item {self.done + 1} {100 * fraction:.0f}% done")

    def _line(self, what: str) -> None:
        extra = " ".join(f"{k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {what}{' | ' + extra if extra else ''} ({_duration(time.monotonic() - self.start)})",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
