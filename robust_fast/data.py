"""Fashion-MNIST, read from the IDX files of the Debian package dataset-fashion-mnist.

The four files live in /usr/share/datasets/fashion-mnist/ once `apt-get install
dataset-fashion-mnist` has run; ROBUST_FAST_DATA (or root=) points elsewhere. The IDX format
(LeCun's MNIST format) is parsed with gzip and numpy: no torchvision, no download.
"""
from __future__ import annotations

import gzip
import os
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "ROBUST_FAST_DATA"
PACKAGE = "dataset-fashion-mnist"

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# IDX type codes (third byte of the magic number) and their big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


def read_idx(path: str) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed when the name ends in .gz).

    Layout: two zero bytes, a type code, the number of dimensions n, n big-endian uint32
    sizes, then the data in C order.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header promises {expected} bytes of data for shape {shape}, "
                         f"the file holds {len(raw) - header}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


def data_root(root: Optional[str] = None) -> str:
    """root, else $ROBUST_FAST_DATA, else the Debian package's folder."""
    if root is not None:
        return os.fspath(root)
    return os.environ.get(ENV_VAR) or DEFAULT_ROOT


def _find(folder: str, name: str) -> str:
    for candidate in (name, name[:-3] if name.endswith(".gz") else name):  # also unpacked files
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {name} not found in {folder}. Install the data set with "
        f"`apt-get install {PACKAGE}` (it fills {DEFAULT_ROOT}), or point {ENV_VAR} "
        f"(or root=) at a folder holding {', '.join(FILES['train'] + FILES['test'])}.")


def available(root: Optional[str] = None) -> bool:
    """True when all four Fashion-MNIST files are present."""
    folder = data_root(root)
    try:
        for names in FILES.values():
            for name in names:
                _find(folder, name)
    except FileNotFoundError:
        return False
    return True


def load_fashion_mnist(split: str = "train", root: Optional[str] = None,
                       limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,)) of the train or test split.

    limit: keep the first `limit` examples (the files' own order).
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {tuple(FILES)}, got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    folder = data_root(root)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Fashion-MNIST folder {folder} does not exist. Install the data set with "
            f"`apt-get install {PACKAGE}` (it fills {DEFAULT_ROOT}), or point {ENV_VAR} "
            f"(or root=) at a folder holding the IDX files.")
    image_name, label_name = FILES[split]
    images = read_idx(_find(folder, image_name))
    labels = read_idx(_find(folder, label_name))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: images {images.shape} and labels {labels.shape} do not pair up")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = False,
            generator: Optional[torch.Generator] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) in batches of batch_size (the last one may be smaller).

    shuffle: a new permutation from `generator` on every call.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images and labels differ in length: {images.shape[0]} != {labels.shape[0]}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = images.shape[0]
    if shuffle:
        device = generator.device if generator is not None else "cpu"
        order = torch.randperm(n, generator=generator, device=device).to(images.device)
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            yield images[index], labels[index.to(labels.device)]
    else:
        for start in range(0, n, batch_size):
            yield images[start:start + batch_size], labels[start:start + batch_size]
