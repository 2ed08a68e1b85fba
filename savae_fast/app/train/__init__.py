"""Training of the paper's six rows (``savae-fast train`` / ``python -m savae_fast.app.train``)."""

from savae_fast.app.train.config import MODES, TrainConfig

__all__ = ["TrainConfig", "MODES", "Trainer"]


def __getattr__(name):
    if name == "Trainer":
        from savae_fast.app.train.loop import Trainer

        return Trainer
    raise AttributeError(name)
