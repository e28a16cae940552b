"""robust_fast.data: the IDX parser on files the test writes, the loader, batches, and the
error for a missing folder."""
import gzip
import os
import struct

import numpy as np
import pytest
import torch

from robust_fast import data


def write_idx(path, array, code=0x08, compress=True):
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)


def write_dataset(folder, n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        image_name, label_name = data.FILES[split]
        write_idx(os.path.join(folder, image_name), images)
        write_idx(os.path.join(folder, label_name), labels)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B),
                                        (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)])
def test_read_idx_round_trip(tmp_path, dtype, code, compress):
    array = (np.arange(2 * 3 * 4) - 7).astype(dtype).reshape(2, 3, 4)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, array, code=code, compress=compress)
    parsed = data.read_idx(str(path))
    assert parsed.shape == (2, 3, 4) and parsed.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(parsed, array)
    parsed[0, 0, 0] = 1  # a writable copy


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad.gz"
    with gzip.open(bad_magic, "wb") as f:
        f.write(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(str(bad_magic))
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 0x08, 1, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="promises 10 bytes"):
        data.read_idx(str(truncated))
    unknown = tmp_path / "code.gz"
    with gzip.open(unknown, "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 0x07, 1, 1) + b"\x00")
    with pytest.raises(ValueError, match="type code"):
        data.read_idx(str(unknown))


def test_load_from_written_folder(tmp_path):
    arrays = write_dataset(tmp_path)
    for split in ("train", "test"):
        x, y = data.load_fashion_mnist(split, root=str(tmp_path))
        images, labels = arrays[split]
        assert x.dtype == torch.float32 and x.shape == (len(labels), 1, 28, 28)
        assert y.dtype == torch.int64 and y.shape == (len(labels),)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        torch.testing.assert_close(x[:, 0] * 255, torch.from_numpy(images).float())
        assert torch.equal(y, torch.from_numpy(labels).long())
    x, y = data.load_fashion_mnist("train", root=str(tmp_path), limit=2)
    assert x.shape[0] == y.shape[0] == 2
    assert data.available(str(tmp_path))


def test_root_from_environment(tmp_path, monkeypatch):
    write_dataset(tmp_path)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    x, _ = data.load_fashion_mnist("test")
    assert x.shape[0] == 3


def test_missing_folder_names_folder_and_package(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        data.load_fashion_mnist("train", root=str(missing))
    message = str(info.value)
    assert str(missing) in message and "apt-get install dataset-fashion-mnist" in message
    assert not data.available(str(missing))


def test_missing_file_names_it(tmp_path):
    write_dataset(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz.*dataset-fashion-mnist"):
        data.load_fashion_mnist("test", root=str(tmp_path))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        data.load_fashion_mnist("validation", root=str(tmp_path))
    with pytest.raises(ValueError, match="limit"):
        data.load_fashion_mnist("train", root=str(tmp_path), limit=-1)


def test_batches():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    plain = list(data.batches(x, y, 4))
    assert [len(b[1]) for b in plain] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in plain]), y)
    g = torch.Generator().manual_seed(0)
    shuffled = list(data.batches(x, y, 3, shuffle=True, generator=g))
    labels = torch.cat([b[1] for b in shuffled])
    assert sorted(labels.tolist()) == list(range(10)) and not torch.equal(labels, y)
    for xb, yb in shuffled:  # pairs stay paired
        assert torch.equal(xb[:, 0].long(), yb)
    again = torch.cat([b[1] for b in data.batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert torch.equal(again, labels)
    with pytest.raises(ValueError, match="batch_size"):
        list(data.batches(x, y, 0))
    with pytest.raises(ValueError, match="differ"):
        list(data.batches(x, y[:3], 2))


@pytest.mark.skipif(not data.available(), reason=f"Fashion-MNIST not installed ({data.data_root()})")
def test_real_fashion_mnist():
    x, y = data.load_fashion_mnist("test", limit=100)
    assert x.shape == (100, 1, 28, 28) and y.shape == (100,)
    assert float(x.max()) <= 1.0 and float(x.min()) >= 0.0 and float(x.max()) > 0.5
    full_x, full_y = data.load_fashion_mnist("test")
    assert full_x.shape[0] == 10000 and set(full_y.unique().tolist()) == set(range(10))
    assert torch.equal(full_x[:100], x)
