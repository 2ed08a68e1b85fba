"""Binary image data: scikit-learn's bundled 8x8 digits (no download) by default;
OMNIGLOT (Burda et al.'s chardata.mat) and MNIST files users bring."""

from __future__ import annotations

import gzip
import os

import numpy as np
import torch

from savae_fast.app.errors import DataError


def _binarize(x: np.ndarray, threshold: float) -> torch.Tensor:
    return torch.from_numpy((x > threshold).astype(np.float32))


def digits(seed: int = 0, valid_fraction: float = 0.1, test_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """The 1797 8x8 handwritten digits shipped inside scikit-learn, binarised at half intensity,
    split deterministically: [N, 1, 8, 8] float tensors in {0, 1}."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("the digits data set needs scikit-learn: pip install scikit-learn") from exc
    images = load_digits().images  # values 0..16
    x = _binarize(images, 8.0).unsqueeze(1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test, n_valid = int(test_fraction * len(x)), int(valid_fraction * len(x))
    return {"test": x[perm[:n_test]], "valid": x[perm[n_test:n_test + n_valid]], "train": x[perm[n_test + n_valid:]]}


def omniglot(path: str, seed: int = 0, valid_count: int = 1345) -> dict[str, torch.Tensor]:
    """Burda et al.'s OMNIGLOT (chardata.mat: 'data' and 'testdata', 784 x N, gray levels),
    dynamically-binarised-once with a fixed seed, [N, 1, 28, 28]."""
    if not os.path.isfile(path):
        raise DataError(f"OMNIGLOT file not found: {path}")
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise DataError("OMNIGLOT (chardata.mat) needs SciPy: pip install scipy") from exc
    try:
        mat = loadmat(path)
        train, test = mat["data"].T.astype(np.float32), mat["testdata"].T.astype(np.float32)
    except Exception as exc:  # missing keys, not a .mat file, truncated: scipy raises many kinds
        raise DataError(f"not a chardata.mat OMNIGLOT file: {path} ({type(exc).__name__}: {exc})") from exc
    gen = np.random.default_rng(seed)
    to_img = lambda a: torch.from_numpy((gen.random(a.shape) < a).astype(np.float32)).view(  # noqa: E731
        -1, 28, 28).transpose(1, 2).unsqueeze(1)
    train, test = to_img(train), to_img(test)
    return {"train": train[valid_count:], "valid": train[:valid_count], "test": test}


def mnist(path: str, valid_count: int = 10000) -> dict[str, torch.Tensor]:
    """MNIST from ``mnist.npz`` (x_train/x_test) or a directory with the four idx(.gz) files,
    binarised at half intensity, [N, 1, 28, 28]; the last ``valid_count`` training images
    before the rest are the validation split."""
    def idx_images(p):
        opener = gzip.open if p.endswith(".gz") else open
        try:
            with opener(p, "rb") as f:
                data = f.read()
        except (OSError, EOFError) as exc:  # also a truncated or corrupt .gz
            raise DataError(f"cannot read MNIST idx file {p}: {exc}") from exc
        if len(data) < 16 or int.from_bytes(data[:4], "big") != 2051:
            raise DataError(f"not an MNIST image idx file: {p}")
        n, rows, cols = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
        if len(data) != 16 + n * rows * cols:
            raise DataError(f"MNIST idx file is truncated or has trailing bytes: {p} ({len(data) - 16} bytes of "
                            f"pixels for {n} images of {rows}x{cols})")
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)

    if os.path.isfile(path) and path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = [k for k in ("x_train", "x_test") if k not in f.files]
                if missing:
                    raise DataError(f"MNIST file {path} lacks {', '.join(missing)} (it has {sorted(f.files)})")
                train, test = f["x_train"], f["x_test"]
        except DataError:
            raise
        except Exception as exc:  # not a zip, truncated, a pickled object: numpy raises many kinds
            raise DataError(f"not a readable mnist.npz: {path} ({type(exc).__name__}: {exc})") from exc
    elif os.path.isdir(path):
        names = {n.replace(".gz", ""): os.path.join(path, n) for n in os.listdir(path)}
        try:
            train, test = idx_images(names["train-images-idx3-ubyte"]), idx_images(names["t10k-images-idx3-ubyte"])
        except KeyError as exc:
            raise DataError(f"MNIST directory lacks {exc.args[0]}: {path}") from exc
    else:
        raise DataError(f"MNIST data not found (mnist.npz or a directory of idx files): {path}")
    for name, x in (("training", train), ("test", test)):
        if x.ndim != 3 or x.shape[1:] != (28, 28) or not (np.issubdtype(x.dtype, np.integer)
                                                          or np.issubdtype(x.dtype, np.floating)):
            raise DataError(f"MNIST {name} images must be [N, 28, 28] numbers, got {x.shape} {x.dtype}: {path}")
    if len(train) <= valid_count or len(test) == 0:
        raise DataError(f"MNIST data has {len(train)} training and {len(test)} test images: {path} (needs more than "
                        f"{valid_count} training images, the validation split, and some test images)")
    if np.issubdtype(train.dtype, np.floating) and max(train.max(), test.max()) <= 1.0:
        threshold = 0.5  # images already scaled to [0, 1]
    else:
        threshold = 127.5
    train = _binarize(train, threshold).unsqueeze(1)
    test = _binarize(test, threshold).unsqueeze(1)
    return {"train": train[valid_count:], "valid": train[:valid_count], "test": test}


def image_batches(x: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> list[torch.Tensor]:
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
    return [x[idx[i:i + batch_size]] for i in range(0, len(x), batch_size)]
