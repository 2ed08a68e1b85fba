"""Start-up cost of the package and its command line against ``import torch``.

Each command is a fresh interpreter; the commands are run interleaved, round after round, so
that a change in the machine's load hits all of them alike, and the median wall time of each is
reported with its ratio to ``import torch`` (the floor: nothing in savae_fast can start faster).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch": "import torch",
    "import savae_fast": "import savae_fast",
    "savae-fast --help": "from savae_fast.app.cli import main; raise SystemExit(main(['--help']))",
    "savae-fast train --help": "from savae_fast.app.cli import main; raise SystemExit(main(['train', '--help']))",
}


def bench_startup(rounds: int = 5) -> dict:
    times = {name: [] for name in COMMANDS}
    for _ in range(rounds):
        for name, code in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["import torch"])
    rows = [{"command": name, "seconds": statistics.median(t), "max_seconds": max(t),
             "vs_import_torch": statistics.median(t) / floor} for name, t in times.items()]
    return {"rounds": rounds, "rows": rows}


def startup_table(result: dict) -> str:
    lines = ["| command | median s | max s | x import torch |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| `{r['command']}` | {r['seconds']:.2f} | {r['max_seconds']:.2f} | {r['vs_import_torch']:.2f} |")
    return "\n".join(lines)
