"""How many intra-op threads a training or evaluation process uses on the CPU.

PyTorch's default is one thread per core. Measured on a 2-core machine
(``python -m benchmarks.threads``; README, "Threads"): with every core busy with other
processes, two threads made a training batch 2 to 3 times slower at the median and up to
20 s in the worst case (each parallel region of the decoder's small matrix products waits
for a thread the OS has descheduled), where one thread slowed down by 1.5 to 2x. On an idle
machine two threads were 1.35 to 1.45x faster for the larger models and no faster for the
demo's small LSTMs. The default leaves one core to everything else, uses no more threads
than cores idle at the start (the 1-minute load average), and one thread for small text
models, which gain nothing from more.
"""

from __future__ import annotations

import math
import os

# text models up to this decoder size gain nothing from more threads (the demo's: hidden 64)
SMALL_TEXT_HIDDEN = 128


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_threads(cfg, cores: int | None = None, load: float | None = None) -> int:
    """The default number of threads for a configuration (``cfg.threads == 0``)."""
    if cfg.dataset in ("synthetic", "text", "ptb") and cfg.hidden_dim <= SMALL_TEXT_HIDDEN:
        return 1
    cores = available_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    return max(1, min(cores - 1, math.floor(cores - load)))


def apply_threads(cfg) -> int:
    """torch.set_num_threads for the configuration; returns the number."""
    import torch

    threads = cfg.threads or auto_threads(cfg)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
