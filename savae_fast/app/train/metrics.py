"""What a training run writes and shows: per-epoch metrics (metrics.csv, one row per
epoch, and metrics.json, the whole history) and the progress bar."""

from __future__ import annotations

import csv
import json
import os
import sys


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
    """A tqdm bar over one epoch's batches on stderr, or nothing (``enabled=False``)."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)

    def update(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(**postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
