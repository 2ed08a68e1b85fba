"""A decoder trained by this package's own training loop, for the accuracy benchmark.

    python benchmarks/trained_decoder.py [--epochs 8] [--out benchmarks/fixtures/trained_synthetic_savae.pt]

Trains the demo's SA-VAE text row (``savae_fast.app.demo.TEXT``: the synthetic
experiment's data, latent 2, embedding 32, hidden 64; Adam 2e-3, K = 20) and saves the
decoder's weights with the model sizes and 64 test sentences (about 150 KB). Trained
decoders have larger, more structured weights than a fresh initialisation, which is where
difference quotients lose accuracy; the benchmark measures every method on this one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(HERE, "benchmarks", "fixtures", "trained_synthetic_savae.pt")


def train(epochs: int, out: str) -> None:
    from savae_fast.app.demo import TEXT
    from savae_fast.app.train.config import TrainConfig
    from savae_fast.app.train.loop import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainConfig(**{**TEXT, "epochs": epochs, "eval_samples": 10}, mode="savae", out_dir=run_dir)
        trainer = Trainer(cfg, progress=False)
        trainer.fit()
        decoder = trainer.model.decoder
        test = trainer.data.batches("test", 64, shuffle=False)[0]
        state = {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}
        history = trainer.state["history"]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    torch.save({"decoder": state, "sizes": {"vocab_size": trainer.data.vocab_size, "latent_dim": cfg.latent_dim,
                                            "embed_dim": cfg.embed_dim, "hidden_dim": cfg.hidden_dim},
                "x": test.cpu(), "epochs": epochs, "valid_nll_bound": history[-1]["valid_nll_bound"],
                "trained_with": "savae_fast.app.demo.TEXT, mode savae"}, out)
    weights = torch.cat([v.flatten().abs() for k, v in state.items() if "weight" in k])
    print(f"wrote {out}: {os.path.getsize(out) / 1e3:.0f} KB, valid NLL bound {history[-1]['valid_nll_bound']:.2f}, "
          f"|weight| mean {weights.mean():.3f}, max {weights.max():.2f}")


def load(device: str = "cpu", dtype=torch.float32, path: str = FIXTURE):
    """(decoder, test sentences) from the fixture."""
    from savae_fast.models import LSTMDecoder

    blob = torch.load(path, map_location="cpu", weights_only=True)
    s = blob["sizes"]
    decoder = LSTMDecoder(s["vocab_size"], s["latent_dim"], s["embed_dim"], s["hidden_dim"], dropout=0.0)
    decoder.load_state_dict(blob["decoder"])
    return decoder.to(device=device, dtype=dtype).eval(), blob["x"].to(device)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default=FIXTURE)
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    train(args.epochs, args.out)
