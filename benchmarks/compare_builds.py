"""Two builds of savae_fast side by side: the small-LSTM SA-VAE training step with
refine(hvp="fd_forward") over the decoder floor, in alternating processes.

    python benchmarks/compare_builds.py OTHER_CHECKOUT [--runs 3] [--rounds 30] [--out FILE.json]

OTHER_CHECKOUT is a source tree of another commit with its extension built in place
(for example ``git worktree add /tmp/old <commit>`` and ``python setup.py build_ext
--inplace`` there). Each process measures the floor and the training step interleaved
and reports the median of per-round ratios, so machine-speed drift between processes
(this machine's clock varies by 30%) cancels; the processes alternate between the two
trees. The child uses only the public ``savae_fast.refine`` and a decoder defined here,
so any commit with that function can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The benchmark suite's small_lstm configuration.
V, E, H, T, B, D, K = 200, 32, 64, 12, 32, 16, 20


def child(rounds: int) -> dict:
    import torch
    import torch.nn as nn

    import savae_fast as sf

    class Decoder(nn.Module):
        """The paper's text decoder: z concatenated to every input and mapped to the initial state."""

        def __init__(self):
            super().__init__()
            self.embed, self.rnn = nn.Embedding(V, E), nn.LSTM(E + D, H, batch_first=True)
            self.out, self.z_to_h = nn.Linear(H, V), nn.Linear(D, H)

        def nll(self, x, z):
            inp = torch.cat([self.embed(x[:, :-1]), z.unsqueeze(1).expand(-1, x.shape[1] - 1, -1)], 2)
            h0 = self.z_to_h(z).unsqueeze(0)
            out, _ = self.rnn(inp, (h0, torch.zeros_like(h0)))
            logp = self.out(out).log_softmax(-1)
            return -logp.gather(2, x[:, 1:].unsqueeze(2)).squeeze(2).sum(1)

    torch.manual_seed(0)
    dec = Decoder()
    x = torch.randint(0, V, (B, T + 1))
    mu0 = (0.5 * torch.randn(B, D)).requires_grad_()
    logvar0 = (0.3 * torch.randn(B, D)).requires_grad_()
    noise, final_eps = torch.randn(K, B, D), torch.randn(B, D)
    params = list(dec.parameters())

    def step():
        mu_k, logvar_k = sf.refine(mu0, logvar0, lambda z: dec.nll(x, z), params, steps=K, noise=noise)
        z = mu_k + torch.exp(0.5 * logvar_k) * final_eps
        kl = 0.5 * (mu_k ** 2 + logvar_k.exp() - logvar_k - 1).sum(1)
        torch.autograd.grad((dec.nll(x, z) + kl).mean(), [mu0, logvar0, *params])

    def floor():
        for _ in range(2 * K + 1):
            zz = mu0.detach().requires_grad_(True)
            torch.autograd.grad(dec.nll(x, zz).sum(), [zz, *params])

    for _ in range(5):
        step()
        floor()
    t_step, t_floor = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        floor()
        t1 = time.perf_counter()
        step()
        t2 = time.perf_counter()
        t_floor.append(t1 - t0)
        t_step.append(t2 - t1)
    return {"median_ratio": statistics.median(s / f for s, f in zip(t_step, t_floor)),
            "ratio_of_minima": min(t_step) / min(t_floor),
            "step_ms": 1e3 * statistics.median(t_step), "floor_ms": 1e3 * statistics.median(t_floor),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "module": sf.__file__}


def run_child(tree: str, rounds: int) -> dict:
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--rounds", str(rounds)],
                         env=env, check=True, capture_output=True, text=True, cwd=tree)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not os.path.abspath(result["module"]).startswith(os.path.abspath(tree)):
        raise RuntimeError(f"the child imported {result['module']}, not the tree {tree}")
    return result


def git_commit(tree: str) -> str:
    try:
        return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", nargs="?")
    parser.add_argument("--runs", type=int, default=3, help="processes per tree (alternating)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved floor/step rounds per process")
    parser.add_argument("--out", help="write the results as JSON")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.rounds)))
        return
    if not args.other:
        parser.error("the other checkout is required")
    trees = {f"this ({git_commit(HERE)})": HERE, f"other ({git_commit(args.other)})": os.path.abspath(args.other)}
    results = {name: [] for name in trees}
    for _ in range(args.runs):
        for name, tree in trees.items():
            r = run_child(tree, args.rounds)
            results[name].append(r)
            print(f"{name:16s} fd_forward / floor {r['median_ratio']:.4f} (minima {r['ratio_of_minima']:.4f}), "
                  f"step {r['step_ms']:.1f} ms, floor {r['floor_ms']:.1f} ms", flush=True)
    for name, rs in results.items():
        ratios = [r["median_ratio"] for r in rs]
        print(f"{name:16s} median over processes {statistics.median(ratios):.4f} "
              f"(range {min(ratios):.4f} to {max(ratios):.4f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": {"V": V, "E": E, "H": H, "T": T, "B": B, "D": D, "K": K},
                       "date": time.strftime("%Y-%m-%d"), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
