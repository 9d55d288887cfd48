"""Where `adm eval` finds network weights (adm's cache, torch hub's, under pytorch-fid's and
torch-fidelity's names), the SHA-256 check of what it finds, and failing fast without a network."""

from __future__ import annotations

import hashlib
import socket
import time

import numpy as np
import pytest

from adm.cli import main as cli
from adm.evaluation import inception, weights
from adm.evaluation.weights import WeightsError

PYTORCH_FID, TORCH_FIDELITY = inception.WEIGHTS_NAMES


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """Empty, private cache folders: $ADM_CACHE_DIR, $HOME (~/.cache/adm) and $TORCH_HOME."""
    dirs = {
        "adm": tmp_path / "adm",
        "home_adm": tmp_path / "home" / ".cache" / "adm",
        "hub": tmp_path / "torch" / "hub" / "checkpoints",
    }
    monkeypatch.setenv("ADM_CACHE_DIR", str(dirs["adm"]))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return dirs


def _put(folder, name, payload=b"weights") -> tuple:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(payload)
    return folder / name, hashlib.sha256(payload).hexdigest()


def test_search_order_and_the_names_of_the_peer_tools(homes) -> None:
    assert weights.search_dirs() == [homes["adm"], homes["home_adm"], homes["hub"]]
    hub_file, digest = _put(homes["hub"], TORCH_FIDELITY)
    assert inception.resolve_weights(sha256=digest, allow_download=False) == hub_file
    pfid_file, _ = _put(homes["hub"], PYTORCH_FID)
    assert inception.resolve_weights(sha256=digest, allow_download=False) == pfid_file
    home_file, _ = _put(homes["home_adm"], PYTORCH_FID)
    assert inception.resolve_weights(sha256=digest, allow_download=False) == home_file
    own, _ = _put(homes["adm"], PYTORCH_FID)
    assert inception.resolve_weights(sha256=digest, allow_download=False) == own


def test_xdg_cache_home_moves_the_hub_folder(homes, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.hub_checkpoints_dir() == tmp_path / "xdg" / "torch" / "hub" / "checkpoints"


def test_a_found_file_with_another_sha256_is_refused_by_name(homes) -> None:
    path, _ = _put(homes["hub"], PYTORCH_FID, b"half a download")
    with pytest.raises(WeightsError) as err:
        inception.resolve_weights(allow_download=False)
    message = str(err.value)
    assert message.startswith(f"{path}: SHA-256 ") and inception.WEIGHTS_SHA256 in message
    assert f"--inception-weights {path}" in message


def _dns_that_hangs(*args, **kwargs):
    time.sleep(30)  # what a machine without a resolver does until its DNS timeout
    raise socket.gaierror("timed out")


def test_without_a_network_the_download_fails_within_5_seconds(homes, monkeypatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _dns_that_hangs)
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        inception.resolve_weights(progress=False)
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert (
        message.startswith("could not download Inception weights (") and "not reachable" in message
    )
    assert f"put it at {homes['adm'] / PYTORCH_FID}" in message and "--inception-weights" in message
    assert not homes["adm"].exists() or not any(homes["adm"].iterdir())


def test_adm_eval_offline_is_one_line_within_5_seconds(homes, tmp_path, monkeypatch, capsys):
    batch = tmp_path / "b.npz"
    np.savez(batch, arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    monkeypatch.setattr(socket, "getaddrinfo", _dns_that_hangs)
    start = time.monotonic()
    code = cli.main(["eval", str(batch), str(batch), "--metrics", "fid"])
    elapsed = time.monotonic() - start
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and elapsed < 5
    assert err.startswith("adm eval: error: could not download Inception weights")
