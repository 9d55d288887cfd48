"""Checkpoints: recognising every preset from key names and shapes, strict loading with no flags,
safetensors with the resolved config, atomic writes, bad files, and the loopback download test."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adm.models import checkpoint
from adm.models.checkpoint import (
    CheckpointError,
    convert,
    detect_preset,
    load_model,
    load_state_dict,
    read_preset,
    save_model,
)
from adm.models.fetch import fetch
from adm.models.overrides import apply_overrides
from adm.models.presets import (
    PRESETS,
    RELEASED,
    build_model,
    get_preset,
    state_dict_shapes,
)
from loopback_http import Served, serve

SHARED_ARCHITECTURE = ("256x256_diffusion_uncond", "lsun_bedroom", "lsun_cat", "lsun_horse",
                       "lsun_horse_nodropout")  # fmt: skip


def meta_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The original key names and shapes of a preset as meta tensors (nothing allocated)."""
    preset = get_preset(name)
    shapes = state_dict_shapes(preset.network, preset.kind)
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def random_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(get_preset(name))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)  # zero-initialised output layers would hide loading mistakes
    return model.eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- recognising presets -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_detected_from_key_names_and_shapes(name: str) -> None:
    state_dict = meta_state_dict(name)
    expected = SHARED_ARCHITECTURE[0] if name in SHARED_ARCHITECTURE else name
    assert detect_preset(state_dict).name == expected
    assert detect_preset(state_dict, hint=name).name == name  # the file stem breaks ties


def test_only_the_unconditional_256_models_share_an_architecture() -> None:
    groups: dict[tuple, list[str]] = {}
    for name in RELEASED:
        preset = get_preset(name)
        key = tuple(state_dict_shapes(preset.network, preset.kind).items())
        groups.setdefault(key, []).append(name)
    shared = [g for g in groups.values() if len(g) > 1]
    assert shared == [list(SHARED_ARCHITECTURE)]


def test_no_fit_names_the_closest_preset_and_the_first_differences() -> None:
    state_dict = meta_state_dict("256x256_diffusion")
    state_dict["out.2.weight"] = torch.empty(3, 256, 3, 3, device="meta")  # fixed sigma
    del state_dict["input_blocks.1.0.in_layers.0.bias"]
    state_dict["extra.weight"] = torch.empty(2, device="meta")
    with pytest.raises(ValueError) as info:
        detect_preset(state_dict)
    message = str(info.value)
    assert "closest is 256x256_diffusion with 3 difference(s)" in message
    assert "missing input_blocks.1.0.in_layers.0.bias [256]" in message
    assert "out.2.weight is [3, 256, 3, 3], expected [6, 256, 3, 3]" in message
    assert "unexpected extra.weight [2]" in message
    assert len(message) < 700  # one clear message, never a wall of keys
    prefixed = {f"module.{k}": v for k, v in meta_state_dict("tiny_classifier").items()}
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        detect_preset(prefixed)


# ---- loading and saving --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_diffusion", "tiny_upsampler", "tiny_classifier"])
def test_released_format_pt_loads_with_no_flags(tmp_path: Path, name: str) -> None:
    model = random_model(name)
    path = tmp_path / "some_download.pt"
    torch.save(model.state_dict(), path)  # exactly what the original's checkpoints are
    loaded, preset = load_model(path)
    assert preset.name == name and not loaded.training
    assert_same_weights(model, loaded)
    assert type(loaded) is type(model)


def test_loaded_model_computes_what_the_saved_one_did(tmp_path: Path) -> None:
    model = random_model("tiny_diffusion")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded, _ = load_model(tmp_path / "m.pt")
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_safetensors_round_trip_carries_a_non_preset_config(tmp_path: Path) -> None:
    preset = apply_overrides(get_preset("tiny_diffusion"),
                             ["unet.num_classes=10", "unet.model_channels=64", "name=my_model",
                              "sampling.steps=50", "diffusion.noise_schedule=cosine"])  # fmt: skip
    torch.manual_seed(1)
    model = build_model(preset)
    path = save_model(model, preset, tmp_path / "mine.safetensors")
    assert read_preset(path) == preset
    loaded, found = load_model(path)
    assert found == preset and found.name == "my_model"
    assert_same_weights(model, loaded)
    with pytest.raises(ValueError, match="fits no preset"):
        detect_preset(load_state_dict(path))  # the metadata is what makes it self-describing


def test_lsun_files_are_told_apart_by_their_names(tmp_path: Path) -> None:
    """Shared-architecture presets: the released file name picks the right one, so the right
    sampling recipe follows; `adm convert` records it in the safetensors metadata."""
    state_dict = meta_state_dict("lsun_cat")
    assert detect_preset(state_dict, hint="lsun_cat").sampling.steps == "1000"
    assert detect_preset(state_dict, hint="renamed").name == "256x256_diffusion_uncond"


def test_convert_both_ways_keeps_every_tensor(tmp_path: Path) -> None:
    model = random_model("tiny_classifier")
    torch.save(model.state_dict(), tmp_path / "tiny_classifier.pt")
    preset = convert(tmp_path / "tiny_classifier.pt", tmp_path / "c.safetensors")
    assert preset.name == "tiny_classifier"
    assert read_preset(tmp_path / "c.safetensors") == preset
    convert(tmp_path / "c.safetensors", tmp_path / "back.pt")
    original, back = model.state_dict(), load_state_dict(tmp_path / "back.pt")
    assert list(back) == list(original)
    assert all(torch.equal(original[k], back[k]) for k in original)
    convert(tmp_path / "back.pt", tmp_path / "half.safetensors", dtype=torch.float16)
    half = load_state_dict(tmp_path / "half.safetensors")
    assert {t.dtype for t in half.values()} == {torch.float16}
    loaded, _ = load_model(tmp_path / "half.safetensors")  # cast back to fp32 by default
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    kept, _ = load_model(tmp_path / "half.safetensors", dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.float16}


def test_load_by_preset_name_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADM_CACHE_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match="adm fetch 256x256_classifier"):
        load_model("256x256_classifier")
    with pytest.raises(CheckpointError, match="no released weights"):
        load_model("tiny_classifier")
    model = random_model("tiny_classifier")
    torch.save(model.state_dict(), tmp_path / "tiny_classifier.pt")
    assert_same_weights(load_model("tiny_classifier")[0], model)
    with pytest.raises(CheckpointError, match="did you mean tiny_classifier"):
        load_model("tiny_clasifier")


def test_names_resolve_to_a_file_then_the_bundled_weights_then_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    bundled = checkpoint.BUNDLED_DIR / "fmnist_judge.safetensors"
    assert checkpoint.bundled_names() == ("fmnist_classifier", "fmnist_diffusion", "fmnist_judge")
    (tmp_path / "cache").mkdir()
    judge = random_model("fmnist_judge")
    torch.save(judge.state_dict(), tmp_path / "cache" / "fmnist_judge.pt")
    assert checkpoint.resolve_checkpoint("fmnist_judge") == bundled  # bundled before the cache
    assert checkpoint.resolve_checkpoint("fmnist_judge.safetensors") == bundled
    model, preset = load_model("fmnist_judge")
    assert preset.name == "fmnist_judge" and model.config == preset.network
    torch.save(judge.state_dict(), tmp_path / "fmnist_judge")  # an existing file comes first
    assert checkpoint.resolve_checkpoint("fmnist_judge") == Path("fmnist_judge")
    assert fetch("fmnist_classifier", tmp_path / "cache") == checkpoint.bundled_path(
        "fmnist_classifier"
    )
    with pytest.raises(CheckpointError, match=r"none bundled with adm \(bundled: fmnist_"):
        checkpoint.resolve_checkpoint("tiny_upsampler")


def test_explicit_preset_that_does_not_fit(tmp_path: Path) -> None:
    torch.save(random_model("tiny_classifier").state_dict(), tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="does not fit preset 'tiny_diffusion'"):
        load_model(tmp_path / "c.pt", preset="tiny_diffusion")


def test_save_is_atomic_and_checked(tmp_path: Path) -> None:
    preset = get_preset("tiny_classifier")
    path = tmp_path / "c.safetensors"
    save_model(random_model("tiny_classifier", seed=1), preset, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="meta tensors"):
        save_model(build_model(preset, device="meta"), preset, path)
    with pytest.raises(ValueError, match="differs from preset"):
        save_model(random_model("tiny_diffusion"), preset, path)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        save_model(random_model("tiny_classifier"), preset, tmp_path / "c.bin")
    assert path.read_bytes() == before  # failed writes leave the old file alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]  # no temp files


# ---- bad files -----------------------------------------------------------------------------------


class _RunsCode:
    """A pickle payload that would create a marker file if it were ever unpickled unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_files(tmp_path: Path) -> dict[str, tuple[bytes | None, str]]:
    state_dict = random_model("tiny_classifier").state_dict()
    model_bytes = io.BytesIO()
    torch.save(state_dict, model_bytes)
    full = model_bytes.getvalue()
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))])
    npz = io.BytesIO()
    np.savez(npz, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    files = {
        "empty.pt": (b"", "an empty file"),
        "notes.pt": (b"model weights go here\n", "a text file starting 'model weights go here'"),
        "page.pt": (b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "HTML"),
        "noise.pt": (bytes(range(256)) * 4, "unrecognised binary data"),
        "half.pt": (full[: len(full) // 2], "truncated or damaged zip"),
        "samples.pt": (npz.getvalue(), "NumPy .npz archive with arrays arr_0"),
        "image.pt": (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "a PNG image"),
    }
    expected = {
        "opt.pt": "optimizer state",
        "wrapped.pt": "under 'model'",
        "list.pt": "not a state dict but a list",
        "mixed.pt": "entry 'step' is a int",
    }
    for name, obj in {
        "opt.pt": optimizer.state_dict(),
        "wrapped.pt": {"model": state_dict, "step": 10},
        "list.pt": [torch.zeros(1)],
        "mixed.pt": {"weight": torch.zeros(1), "step": 3},
    }.items():
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        files[name] = (buffer.getvalue(), expected[name])
    code = io.BytesIO()
    torch.save({"weight": _RunsCode(tmp_path / "pwned")}, code)
    files["code.pt"] = (code.getvalue(), "could run code")
    files["plain_pickle.pt"] = (pickle.dumps({"w": 1}, protocol=4), "refused")
    return files


def test_bad_files_get_clear_errors_naming_the_file(tmp_path: Path) -> None:
    for name, (data, message) in _bad_files(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            load_state_dict(path)
        assert str(path) in str(info.value), name
        assert message in str(info.value), (name, str(info.value))
        assert "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()  # the pickled code never ran
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "missing.pt")


def _small_files() -> dict[str, bytes]:
    state_dict = {"a.weight": torch.arange(12.0).reshape(3, 4), "b.bias": torch.ones(5)}
    out = {}
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    out["pt"] = buffer.getvalue()
    from safetensors.torch import save

    out["safetensors"] = save(state_dict, metadata={"format": "pt"})
    return out


SMALL = _small_files()


def _load_bytes(tmp_path: Path, data: bytes, suffix: str) -> dict[str, torch.Tensor] | None:
    path = tmp_path / f"f_{os.getpid()}.{suffix}"
    path.write_bytes(data)
    try:
        return load_state_dict(path)
    except CheckpointError as err:
        assert str(path) in str(err)
        return None


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fmt=st.sampled_from(["pt", "safetensors"]), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_files_always_give_a_checkpoint_error(
    tmp_path: Path, fmt: str, cut: float
) -> None:
    data = SMALL[fmt]
    assert _load_bytes(tmp_path, data[: int(cut * len(data))], fmt) is None


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fmt=st.sampled_from(["pt", "safetensors"]),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1,
                   max_size=8),
)  # fmt: skip
def test_garbled_files_load_or_give_a_checkpoint_error(tmp_path: Path, fmt: str, edits) -> None:
    """Overwritten bytes either leave a loadable state dict (e.g. inside tensor data) or give a
    CheckpointError naming the file: never another exception, never a crash."""
    data = bytearray(SMALL[fmt])
    for where, value in edits:
        data[int(where * len(data))] = value
    result = _load_bytes(tmp_path, bytes(data), fmt)
    if result is not None:
        assert all(isinstance(v, torch.Tensor) for v in result.values())


def test_npz_detection_does_not_need_a_valid_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="zip archive that is not a PyTorch checkpoint"):
        load_state_dict(path)


# ---- downloads (loopback server, no internet) ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = {}
    for name in ("tiny_classifier", "tiny_upsampler"):
        buffer = io.BytesIO()
        torch.save(random_model(name).state_dict(), buffer)
        out[name] = buffer.getvalue()
    return out


def test_fetch_downloads_checks_and_renames(tmp_path: Path, tiny_files) -> None:
    with serve(Served(files={"/c.pt": tiny_files["tiny_classifier"]})) as served:
        path = fetch("tiny_classifier", tmp_path, served.base_url + "/c.pt", progress=False)
        assert path == tmp_path / "tiny_classifier.pt"
        assert path.read_bytes() == tiny_files["tiny_classifier"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_classifier.pt"]
        # Already there and valid: returned without asking the server again.
        assert fetch("tiny_classifier", tmp_path, served.base_url + "/c.pt", progress=False) == path
        assert len(served.requests) == 1
    assert load_model(path)[1].name == "tiny_classifier"


def test_fetch_refuses_a_wrong_file_already_in_the_cache(tmp_path: Path, tiny_files) -> None:
    (tmp_path / "tiny_classifier.pt").write_bytes(tiny_files["tiny_upsampler"])
    with pytest.raises(CheckpointError, match=r"delete .*tiny_classifier\.pt and fetch it again"):
        fetch("tiny_classifier", tmp_path, "http://127.0.0.1:9/unused.pt", progress=False)


def test_fetch_resumes_a_partial_download(tmp_path: Path, tiny_files) -> None:
    data = tiny_files["tiny_classifier"]
    (tmp_path / "tiny_classifier.pt.part").write_bytes(data[:100_000])
    with serve(Served(files={"/c.pt": data})) as served:
        path = fetch("tiny_classifier", tmp_path, served.base_url + "/c.pt", progress=False)
    assert served.requests == [("/c.pt", "bytes=100000-")]
    assert path.read_bytes() == data


def test_fetch_restarts_when_the_server_ignores_ranges(tmp_path: Path, tiny_files) -> None:
    data = tiny_files["tiny_classifier"]
    (tmp_path / "tiny_classifier.pt.part").write_bytes(b"x" * 5000)
    with serve(Served(files={"/c.pt": data}, ignore_range=True)) as served:
        path = fetch("tiny_classifier", tmp_path, served.base_url + "/c.pt", progress=False)
    assert path.read_bytes() == data


def test_fetch_bad_length_keeps_the_part_file_to_resume(tmp_path: Path, tiny_files) -> None:
    data = tiny_files["tiny_classifier"]
    with serve(Served(files={"/c.pt": data}, short_by=1000)) as served:
        with pytest.raises(CheckpointError, match="run the same command again to resume"):
            fetch("tiny_classifier", tmp_path, served.base_url + "/c.pt", progress=False)
        assert not (tmp_path / "tiny_classifier.pt").exists()
        assert (tmp_path / "tiny_classifier.pt.part").stat().st_size == len(data) - 1000
        served.short_by = 0
        path = fetch("tiny_classifier", tmp_path, served.base_url + "/c.pt", progress=False)
    assert served.requests[-1] == ("/c.pt", f"bytes={len(data) - 1000}-")
    assert path.read_bytes() == data


def test_fetch_bad_content_is_deleted_and_never_installed(tmp_path: Path, tiny_files) -> None:
    files = {"/wrong.pt": tiny_files["tiny_upsampler"], "/page": b"<html>Sign in</html>"}
    with serve(Served(files=files)) as served:
        with pytest.raises(CheckpointError, match="is not tiny_classifier and was deleted"):
            fetch("tiny_classifier", tmp_path, served.base_url + "/wrong.pt", progress=False)
        with pytest.raises(CheckpointError, match="HTML"):
            fetch("tiny_classifier", tmp_path, served.base_url + "/page", progress=False)
        with pytest.raises(CheckpointError, match="HTTP 404"):
            fetch("tiny_classifier", tmp_path, served.base_url + "/missing.pt", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_fetch_offline_says_where_to_put_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADM_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError) as info:
        fetch("256x256_classifier", url="http://127.0.0.1:9/256x256_classifier.pt", progress=False)
    message = str(info.value)
    assert str(tmp_path / "cache" / "256x256_classifier.pt") in message
    assert "ADM_CACHE_DIR" in message
    assert checkpoint.default_cache_dir() == tmp_path / "cache"
    with pytest.raises(CheckpointError, match="no released weights"):
        fetch("tiny_diffusion", tmp_path)


# ---- run-time settings (adm._util.runtime) -------------------------------------------------------


def test_precision_falls_back_to_fp32_on_the_cpu() -> None:
    from adm._util.runtime import autocast, resolve_precision

    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.warns(UserWarning, match="only used on CUDA"):
        assert resolve_precision("bf16", "cpu") == "fp32"
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        resolve_precision("fp8", "cpu")
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def test_prepare_model_for_inference_on_the_cpu() -> None:
    from adm._util.runtime import prepare_model

    model = prepare_model(random_model("tiny_classifier").train(), device="cpu")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    conv = model.input_blocks[1][0].in_layers[2].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)  # NHWC for inference
    trainable = prepare_model(random_model("tiny_classifier"), device="cpu", trainable=True)
    assert trainable.input_blocks[1][0].in_layers[2].weight.is_contiguous()  # NCHW for training
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    model(x, torch.tensor([1, 2])).sum().backward()  # guidance still gets input gradients
    assert x.grad is not None
