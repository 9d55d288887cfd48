"""Finding and downloading Fashion-MNIST: search order, checked download, offline message."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from adm.data import fashion_mnist
from adm.data.datasets import DataError


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}i", *array.shape
    )
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def fake_files(monkeypatch, tmp_path):
    """Four small valid IDX files, and FILES pointing at their digests."""
    rng = np.random.default_rng(0)
    contents = {
        "train-images-idx3-ubyte": _idx(rng.integers(0, 256, (6, 28, 28))),
        "train-labels-idx1-ubyte": _idx(np.arange(6) % 10),
        "t10k-images-idx3-ubyte": _idx(rng.integers(0, 256, (4, 28, 28))),
        "t10k-labels-idx1-ubyte": _idx(np.arange(4)),
    }
    monkeypatch.setattr(
        fashion_mnist, "FILES", {k: hashlib.sha256(v).hexdigest() for k, v in contents.items()}
    )
    served = tmp_path / "served"
    served.mkdir()
    for name, data in contents.items():
        (served / f"{name}.gz").write_bytes(gzip.compress(data))
    monkeypatch.setenv("ADM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ADM_DATA_DIR", raising=False)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "nowhere")
    return served


def _serve(folder: Path):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=folder, **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_explicit_folder_and_env_var_come_first(fake_files, monkeypatch):
    assert fashion_mnist.find(fake_files) == fake_files
    monkeypatch.setenv("ADM_DATA_DIR", str(fake_files))
    assert fashion_mnist.find() == fake_files
    images, labels = fashion_mnist.load(fake_files, "t10k")
    assert images.shape == (4, 28, 28) and labels.tolist() == [0, 1, 2, 3]


def test_missing_files_in_an_explicit_folder_are_named(tmp_path):
    with pytest.raises(DataError, match="missing Fashion-MNIST files train-images-idx3-ubyte"):
        fashion_mnist.find(tmp_path)


def test_download_into_the_cache_with_checksums(fake_files, monkeypatch):
    server = _serve(fake_files)
    url = f"http://127.0.0.1:{server.server_port}/"
    monkeypatch.setattr(fashion_mnist, "OFFICIAL_URL", url)
    try:
        folder = fashion_mnist.fetch(fashion_mnist.cache_folder(), url=url)
    finally:
        server.shutdown()
    assert folder == fashion_mnist.cache_folder()
    assert fashion_mnist.find() == folder  # found in the cache from now on
    assert fashion_mnist.load(folder, "train")[0].shape == (6, 28, 28)


def test_corrupt_download_is_rejected(fake_files, tmp_path):
    (fake_files / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"garbage"))
    server = _serve(fake_files)
    try:
        with pytest.raises(DataError, match="wrong contents"):
            fashion_mnist.fetch(tmp_path / "dl", url=f"http://127.0.0.1:{server.server_port}/")
    finally:
        server.shutdown()
    assert not (tmp_path / "dl" / "train-labels-idx1-ubyte.gz").exists()
    assert not [p for p in (tmp_path / "dl").iterdir() if p.name.endswith(".tmp")]  # no leftovers


def test_offline_and_absent_gives_both_remedies(fake_files, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(fashion_mnist, "OFFICIAL_URL", f"http://127.0.0.1:{port}/")
    with pytest.raises(DataError) as err:
        fashion_mnist.find()
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(fashion_mnist.cache_folder()) in message and "download failed" in message
