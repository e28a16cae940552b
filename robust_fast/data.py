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


# --------------------------------------------------------------------------------------------
# tasks from a subset of the classes (transfer learning: a source task and a target task)

SOURCE_CLASSES = (0, 1, 2, 3, 4)   # the default source task: T-shirt/top ... Coat
TARGET_CLASSES = (5, 6, 7, 8, 9)   # the default target task: Sandal ... Ankle boot


def parse_classes(text: str, num_labels: int = len(CLASSES)) -> Tuple[int, ...]:
    """'0-4' or '5,7,9' or '0-2,8' → a tuple of distinct class indices in [0, num_labels), in the
    order given (that order is the new labels' order: the first class named becomes 0)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"classes must be a text such as '0-4' or '5,7,9', got {text!r}")
    found = []
    for part in text.split(","):
        part = part.strip()
        bounds = part.split("-")
        try:
            if len(bounds) == 1:
                found.append(int(bounds[0]))
            elif len(bounds) == 2:
                low, high = int(bounds[0]), int(bounds[1])
                if low > high:
                    raise ValueError
                found.extend(range(low, high + 1))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"classes: cannot read {part!r} of {text!r} (use '0-4' or '5,7,9')") from None
    return check_classes(found, num_labels)


def check_classes(classes, num_labels: int = len(CLASSES)) -> Tuple[int, ...]:
    """classes as a tuple of distinct ints in [0, num_labels), else a ValueError naming them."""
    if isinstance(classes, str):
        return parse_classes(classes, num_labels)
    try:
        values = tuple(classes)
    except TypeError:
        raise ValueError(f"classes must be a sequence of class indices, got {classes!r}") from None
    if not values:
        raise ValueError("classes must name at least one class")
    for c in values:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < num_labels:
            raise ValueError(f"classes must be ints in [0, {num_labels}), got {c!r} in {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"classes must be distinct, got {values}")
    return tuple(int(c) for c in values)


def class_subset(images: torch.Tensor, labels: torch.Tensor, classes, per_class: Optional[int] = None,
                 seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The examples of `classes` only, relabelled 0..k-1 in the order the classes are given
    (classes[i] becomes label i), in their original order.

    per_class: keep at most this many examples of each class, drawn without replacement by a
    generator seeded with `seed` (the same seed, the same images), then kept in their original
    order. None: all of them. The inputs are not modified.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images and labels differ in length: {images.shape[0]} != {labels.shape[0]}")
    classes = check_classes(classes, max(len(CLASSES), int(labels.max()) + 1 if labels.numel() else 0))
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1):
        raise ValueError(f"per_class must be None or an int >= 1, got {per_class!r}")
    generator = torch.Generator().manual_seed(seed)
    keep, new_labels = [], []
    for new, old in enumerate(classes):
        rows = torch.nonzero(labels.cpu() == old).flatten()
        if per_class is not None and rows.numel() > per_class:
            rows = rows[torch.randperm(rows.numel(), generator=generator)[:per_class]].sort().values
        keep.append(rows)
        new_labels.append(torch.full((rows.numel(),), new, dtype=torch.int64))
    rows, relabelled = torch.cat(keep), torch.cat(new_labels)
    order = rows.argsort()  # back to the original order, so no class comes in one block
    rows, relabelled = rows[order], relabelled[order]
    return images[rows.to(images.device)], relabelled.to(labels.device)


def load_task(split: str = "train", classes=SOURCE_CLASSES, per_class: Optional[int] = None, seed: int = 0,
              root: Optional[str] = None, limit: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's `split` restricted to `classes` (relabelled 0..k-1), at most `per_class`
    images of each (seeded draw); limit: the first `limit` examples of the task."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    images, labels = class_subset(*load_fashion_mnist(split, root=root), classes, per_class=per_class, seed=seed)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels
