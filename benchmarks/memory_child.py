"""Peak memory of one training step, in a process of its own (run by
benchmarks.refinement.peak_memory):

    memory_child.py <repository root> <config> <method | floor> <steps> <device>

prints one JSON line: peak_bytes, base_bytes, params."""
import json
import sys

sys.path.insert(0, sys.argv[1])

import torch  # noqa: E402

from benchmarks.configs import CONFIGS, make_problem  # noqa: E402
from benchmarks.refinement import METHODS, decoder_floor  # noqa: E402
from savae_fast.testing import training_step  # noqa: E402


def rss_hwm():
    # VmHWM: this process's own peak resident set. (getrusage's ru_maxrss would also
    # count the parent's resident set at fork time, which exec records as ours.)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except OSError:  # not Linux: ru_maxrss (kilobytes on Linux/BSD, bytes on macOS)
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024


cfg = CONFIGS[sys.argv[2]].with_(steps=int(sys.argv[4]))
device = sys.argv[5]
p = make_problem(cfg, device)
if device == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    base = rss_hwm()
if sys.argv[3] == "floor":
    # A plain training step of the same decoder: the final ELBO pass's gradients (held,
    # as p.grad would be) plus the (2K + 1) decoder passes with theirs.
    held = training_step(lambda *a, **k: (a[0] * 1, a[1] * 1), p)
    decoder_floor(p)
else:
    training_step(METHODS[sys.argv[3]], p)
if device == "cuda":
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
else:
    peak = rss_hwm()
print(json.dumps({"peak_bytes": peak, "base_bytes": base, "params": p.num_params()}))

