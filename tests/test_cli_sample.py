"""`adm sample` / `adm upsample` / `adm nll` end to end on tiny checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adm.cli import main as cli
from adm.diffusion.names import SAMPLER_NAMES
from adm.models import checkpoint, presets


def _nonzero_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fresh ADM nets output exactly zero (zero-init); perturb so that samples mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _save(name: str, path: Path, seed: int, **network_changes) -> Path:
    preset = presets.get_preset(name)
    if network_changes:
        preset = dataclasses.replace(
            preset, network=dataclasses.replace(preset.network, **network_changes)
        )
    model = _nonzero_weights(presets.build_model(preset), seed)
    return checkpoint.save_model(model, preset, path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "model": _save("tiny_diffusion", root / "model.safetensors", 0, num_classes=10),
        "classifier": _save("tiny_classifier", root / "clf.safetensors", 1, out_channels=10),
        "classifier16": _save(
            "tiny_classifier", root / "clf16.safetensors", 2, image_size=16, attention_ds=(2,)
        ),
        "upsampler": _save("tiny_upsampler", root / "up.safetensors", 3, num_classes=10),
    }


def _sample(ckpts, out: Path, *extra: str) -> int:
    args = ["sample", "--checkpoint", str(ckpts["model"]), "--out", str(out), "--no-progress"]
    return cli.main([*args, "--steps", "4", "--num-samples", "4", *extra])


def test_sample_writes_npz_grid_and_settings_with_classifier_guidance(ckpts, tmp_path):
    out = tmp_path / "run"
    rc = _sample(
        ckpts, out, "--classifier", str(ckpts["classifier"]), "--classifier-scale", "2",
        "--classes", "3,7", "--save-pngs", "--sampler", "ddim",
    )  # fmt: skip
    assert rc == 0
    data = np.load(out / "samples_4x32x32x3.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (4, 32, 32, 3)
    assert data["arr_1"].tolist() == [3, 7, 3, 7]
    assert (out / "grid.png").exists() and len(list((out / "images").glob("*.png"))) == 4
    settings = json.loads((out / "settings.json").read_text())
    assert settings["job"]["classifier_scale"] == 2.0 and settings["diffusion"]["steps"] == 1000
    unguided = tmp_path / "unguided"
    assert _sample(ckpts, unguided, "--classes", "3,7", "--sampler", "ddim") == 0
    assert not np.array_equal(np.load(unguided / "samples_4x32x32x3.npz")["arr_0"], data["arr_0"])


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_same_seed_same_images_at_batch_sizes_1_and_4(ckpts, tmp_path, sampler):
    runs = []
    for bs in ("1", "4"):
        out = tmp_path / f"bs{bs}"
        assert _sample(ckpts, out, "--batch-size", bs, "--sampler", sampler, "--seed", "5") == 0
        runs.append(np.load(out / "samples_4x32x32x3.npz"))
    # Same noise and labels per sample; the network's float32 convolutions may pick other kernels
    # for other batch sizes (differences ~1e-6), which can move a pixel across a quantisation
    # boundary: allow that, and nothing more.
    diff = np.abs(runs[0]["arr_0"].astype(int) - runs[1]["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    np.testing.assert_array_equal(runs[0]["arr_1"], runs[1]["arr_1"])


@pytest.mark.parametrize(
    ("extra", "nfe"),
    [
        (("--sampler", "heun", "--grid", "karras", "--steps", "4"), 7),
        (("--sampler", "unipc", "--order", "3", "--grid", "logsnr", "--steps", "5"), 5),
        (("--sampler", "edm", "--churn", "10", "--s-noise", "1.0", "--steps", "3"), 5),
        (("--sampler", "dpm++2m-sde", "--eta", "0.5", "--grid", "trailing", "--steps", "4"), 4),
        (("--sampler", "dpm++3m", "--grid", "quadratic", "--steps", "6", "--classifier-scale",
          "2", "--guidance-interval", "0.5,20"), 6),
    ],
)  # fmt: skip
def test_samplers_grids_and_options_from_the_command_line(ckpts, tmp_path, extra, nfe):
    out = tmp_path / "run"
    extra = [*extra, "--classifier", str(ckpts["classifier"])] if "--classifier-scale" in extra \
        else list(extra)  # fmt: skip
    args = ["sample", "--checkpoint", str(ckpts["model"]), "--out", str(out), "--no-progress"]
    assert cli.main([*args, "--num-samples", "2", *extra]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["nfe"] == nfe
    job = settings["job"]
    assert job["sampler"] == extra[1] and job["steps"] == extra[extra.index("--steps") + 1]
    assert np.load(out / "samples_2x32x32x3.npz")["arr_0"].std() > 0


def test_resume_keeps_finished_batches(ckpts, tmp_path, capsys):
    out = tmp_path / "run"
    assert _sample(ckpts, out, "--batch-size", "2", "--sampler", "ddpm") == 0
    first = np.load(out / "samples_4x32x32x3.npz")["arr_0"]
    kept = (out / "batches" / "batch_000000.npz").stat().st_mtime_ns
    (out / "batches" / "batch_000001.npz").unlink()  # as if killed before the second batch
    assert _sample(ckpts, out, "--batch-size", "2", "--sampler", "ddpm") == 2  # needs --resume
    assert _sample(ckpts, out, "--batch-size", "2", "--sampler", "ddpm", "--resume") == 0
    assert (out / "batches" / "batch_000000.npz").stat().st_mtime_ns == kept
    np.testing.assert_array_equal(np.load(out / "samples_4x32x32x3.npz")["arr_0"], first)
    # resuming with other settings is refused, naming each difference
    assert _sample(ckpts, out, "--batch-size", "2", "--seed", "9", "--resume") == 2
    assert '(job.sampler: "ddpm" -> "ddim"; job.seed: 0 -> 9)' in capsys.readouterr().err
    # ... and so is a checkpoint replaced at the same path (samples of two models in one run)
    moved = _save("tiny_diffusion", tmp_path / "model.safetensors", 0, num_classes=10)
    args = ["--batch-size", "2", "--sampler", "ddpm"]
    assert _sample({**ckpts, "model": moved}, tmp_path / "b", *args) == 0
    (tmp_path / "b" / "batches" / "batch_000001.npz").unlink()
    _save("tiny_diffusion", moved, 1, num_classes=10)  # other weights, same path and preset
    assert _sample({**ckpts, "model": moved}, tmp_path / "b", *args, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "holds a run with other settings (checkpoint_sha256: " in err and err.count("\n") == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_gloo_give_the_same_images_as_one(ckpts, tmp_path):
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process below: float32 reductions split alike
    try:
        assert _sample(ckpts, one, "--batch-size", "1", "--sampler", "ddpm") == 0
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "adm.cli.main",
        "sample", "--checkpoint", str(ckpts["model"]), "--out", str(two), "--no-progress",
        "--steps", "4", "--num-samples", "4", "--batch-size", "1", "--sampler", "ddpm",
        "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    a = np.load(one / "samples_4x32x32x3.npz")
    b = np.load(two / "samples_4x32x32x3.npz")
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])


def test_upsample_a_base_batch(ckpts, tmp_path):
    base = tmp_path / "base.npz"
    rng = np.random.default_rng(0)
    np.savez(base, rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8), np.array([1, 2, 3]))
    out = tmp_path / "up"
    rc = cli.main([
        "upsample", "--checkpoint", str(ckpts["upsampler"]), "--base", str(base), "--out",
        str(out), "--steps", "ddim4", "--sampler", "ddim", "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    data = np.load(out / "samples_3x32x32x3.npz")
    assert data["arr_0"].shape == (3, 32, 32, 3) and data["arr_1"].tolist() == [1, 2, 3]


def test_nll_writes_bits_per_dim(ckpts, tmp_path, capsys):
    data = tmp_path / "data.npz"
    np.savez(data, np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]))
    out = tmp_path / "nll"
    rc = cli.main([
        "nll", "--checkpoint", str(ckpts["model"]), "--data", str(data), "--out", str(out),
        "--steps", "10",
    ])  # fmt: skip
    assert rc == 0
    result = json.loads((out / "nll.json").read_text())
    assert result["num_images"] == 2 and result["bits_per_dim"] > 0
    assert len(result["vb_per_timestep_loop_order"]) == 10


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--classifier", "CLF16"), "works at 16px but the model samples 32px"),
        (("--classes", "12"), "class 12 is out of range"),
        (("--classes", "a,b"), "expected 'random' or integers"),
        (("--classifier-scale", "1"), "needs --classifier"),
        (("--steps", "ddim600"), "no integer stride"),
        (("--out", "/proc/forbidden/run"), "cannot create output folder /proc/forbidden/run"),
        (("--checkpoint", "missing.pt"), "no such file"),
        (("--batch-size", "0"), "--batch-size must be at least 1, got 0"),
        (("--batch-size", "-4"), "--batch-size must be at least 1, got -4"),
        (("--num-samples", "0"), "--num-samples must be at least 1, got 0"),
        (("--eta", "-0.5"), "--eta must be at least 0"),
        (("--seed", "-1"), "--seed must be at least 0, got -1"),
        (("--cfg-scale", "1", "--cfg-null-label", "10"), "--cfg-null-label 10 is out of range"),
        (("--sampler", "heun", "--steps", "1"), "--sampler heun needs --steps of at least 2"),
        (("--sampler", "heun", "--steps", "1", "--grid", "karras"), "at least 2, got 1"),
        (("--grid", "logsnr", "--steps", "ddim25"), "with a grid, steps is a number of steps"),
        (("--grid", "karras", "--steps", "2000"), "only 1000 timesteps"),
        (("--grid", "uniform", "--steps", "0"), "positive integer"),
        (("--sampler", "ddpm", "--eta", "0.5"), "sampler 'ddpm' has no option --eta"),
        (("--sampler", "dpm++2m-sde", "--eta", "2"), "--eta of sampler 'dpm++2m-sde' must be"),
        (("--sampler", "unipc", "--order", "1"), "--order of sampler 'unipc' must be 2 or 3"),
        (("--sampler", "edm", "--churn", "-1"), "--churn of sampler 'edm' must be >= 0"),
        (("--guidance-interval", "0,1"), "--guidance-interval needs guidance"),
        (("--cfg-scale", "2", "--guidance-interval", "5,1"), "expected 0 <= LO <= HI"),
        (("--cfg-scale", "2", "--guidance-interval", "a"), "expected LO,HI"),
    ],
)
def test_bad_input_is_one_clear_line_before_sampling(ckpts, tmp_path, capsys, extra, message):
    extra = tuple(str(ckpts["classifier16"]) if e == "CLF16" else e for e in extra)
    out = tmp_path / "bad"
    args = ["sample", "--checkpoint", str(ckpts["model"]), "--out", str(out), "--no-progress"]
    if "--checkpoint" in extra:
        args = ["sample", "--out", str(out)]
    assert cli.main([*args, "--num-samples", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "batches").exists() or not any((out / "batches").iterdir())


def test_upsample_rejects_a_base_of_the_wrong_size(ckpts, tmp_path, capsys):
    base = tmp_path / "base.npz"
    np.savez(base, np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]))
    rc = cli.main(["upsample", "--checkpoint", str(ckpts["upsampler"]), "--base", str(base),
                   "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2 and "upsamples 16x16x3 images" in capsys.readouterr().err


def test_bundled_names_sample_with_classifier_guidance(tmp_path):
    """The demo's models ship inside adm: their names work like files, no download."""
    out = tmp_path / "fmnist"
    argv = ["sample", "--checkpoint", "fmnist_diffusion", "--classifier", "fmnist_classifier",
            "--classifier-scale", "2", "--num-samples", "2", "--steps", "5", "--classes", "3,7",
            "--out", str(out), "--no-progress"]  # fmt: skip
    rc = cli.main(argv)
    assert rc == 0
    data = np.load(out / "samples_2x28x28x1.npz")
    assert data["arr_0"].shape == (2, 28, 28, 1) and data["arr_1"].tolist() == [3, 7]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["model"] == "fmnist_diffusion" and settings["classifier"] == "fmnist_classifier"


def test_classes_on_an_unconditional_model_need_a_classifier(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["sample", "--checkpoint", "fmnist_diffusion", "--classes", "1,2",
                   "--num-samples", "2", "--steps", "5", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "fmnist_diffusion is unconditional" in err and "--classifier" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [
        ("fmnist_diffusion", "not an upsampler (released upsamplers: 64_256_upsampler"),
        ("tiny_upsampler", "no released weights and none bundled with adm"),
    ],
)
def test_upsample_names_say_which_upsamplers_exist(tmp_path, capsys, checkpoint, message):
    base = tmp_path / "base.npz"
    np.savez(base, np.zeros((2, 16, 16, 3), np.uint8))
    rc = cli.main(["upsample", "--checkpoint", checkpoint, "--base", str(base),
                   "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra", [("--batch-size", "0"), ("--num-samples", "-1")])
def test_nll_rejects_counts_below_one(ckpts, tmp_path, capsys, extra):
    data = tmp_path / "d.npz"
    np.savez(data, np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]))
    rc = cli.main(["nll", "--checkpoint", str(ckpts["model"]), "--data", str(data),
                   "--out", str(tmp_path / "o"), *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and f"{extra[0]} must be at least 1" in err
    assert not (tmp_path / "o").exists()
