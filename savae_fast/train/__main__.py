"""``python -m savae_fast.train [options]`` (also under torchrun) == ``savae-fast train``."""

import sys

from savae_fast.cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
