"""``python -m savae_fast.app.train [options]`` (also under torchrun) == ``savae-fast train``."""

from savae_fast.app.train.command import main

raise SystemExit(main())
