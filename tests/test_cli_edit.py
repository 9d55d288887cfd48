"""`adm inpaint` / `adm edit` end to end on a tiny checkpoint, and their one-line input errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adm.cli import main as cli
from adm.models import checkpoint, presets


def _save(name: str, path: Path, seed: int, **network_changes) -> Path:
    preset = presets.get_preset(name)
    preset = dataclasses.replace(
        preset, network=dataclasses.replace(preset.network, **network_changes)
    )
    model = presets.build_model(preset)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # fresh ADM nets output zero: perturb so that edits mean something
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return checkpoint.save_model(model, preset, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("edit")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(root / "images.npz", images, np.array([1, 2, 3, 4]))
    keep = np.zeros((1, 32, 32), np.uint8)
    keep[:, :, :16] = 255  # left half kept
    np.savez(root / "left.npz", keep)
    np.savez(root / "zeros.npz", np.zeros((1, 32, 32), np.uint8))
    np.savez(root / "ones.npz", np.full((4, 32, 32), 255, np.uint8))
    return {
        "root": root,
        "model": _save("tiny_diffusion", root / "uncond.safetensors", 0, num_classes=None),
        "classifier": _save("tiny_classifier", root / "clf.safetensors", 1, out_channels=10),
        "images": root / "images.npz",
        "left": root / "left.npz",
        "zeros": root / "zeros.npz",
        "ones": root / "ones.npz",
    }


def _inpaint(files, out: Path, *extra: str, masks: str = "left") -> int:
    argv = ["inpaint", "--checkpoint", str(files["model"]), "--images", str(files["images"]),
            "--masks", str(files[masks]), "--steps", "4", "--out", str(out),
            "--no-progress"]  # fmt: skip
    return cli.main([*argv, *extra])


def _edits(out: Path) -> np.ndarray:
    return np.load(out / "edits_4x32x32x3.npz")["arr_0"]


def test_repaint_keeps_the_known_region_bit_exactly_and_writes_its_outputs(files, tmp_path):
    out = tmp_path / "run"
    guided = ("--classifier", str(files["classifier"]), "--classifier-scale", "3")
    assert (
        _inpaint(files, out, "--resample", "2", "--jump", "2", *guided, "--classes", "labels") == 0
    )
    edits, images = _edits(out), np.load(files["images"])["arr_0"]
    np.testing.assert_array_equal(edits[:, :, :16], images[:, :, :16])
    assert not np.array_equal(edits[:, :, 16:], images[:, :, 16:])
    assert np.load(out / "edits_4x32x32x3.npz")["arr_1"].tolist() == [1, 2, 3, 4]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["job"]["resample"] == 2 and settings["nfe"] == 4 + 2 * 1
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 + 4 * 34, 2 + 3 * 34, 3)  # a row of input | mask | output each


def test_masks_of_all_ones_return_the_input(files, tmp_path):
    assert _inpaint(files, tmp_path / "o", "--resample", "3", "--jump", "2", masks="ones") == 0
    np.testing.assert_array_equal(_edits(tmp_path / "o"), np.load(files["images"])["arr_0"])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m-sde"])
def test_a_mask_of_all_zeros_is_adm_sample_with_the_same_seeds(files, tmp_path, sampler):
    seeds = ["--seed", "3", "--batch-size", "4", "--sampler", sampler]
    assert _inpaint(files, tmp_path / "inpaint", *seeds, masks="zeros") == 0
    argv = ["sample", "--checkpoint", str(files["model"]), "--num-samples", "4", "--steps", "4",
            "--out", str(tmp_path / "sample"), "--no-progress", *seeds]  # fmt: skip
    assert cli.main(argv) == 0
    sampled = np.load(tmp_path / "sample" / "samples_4x32x32x3.npz")["arr_0"]
    np.testing.assert_array_equal(_edits(tmp_path / "inpaint"), sampled)


@pytest.mark.parametrize("command", ["inpaint", "inpaint-unipc", "edit"])
def test_images_are_the_same_at_batch_sizes_1_and_4(files, tmp_path, command):
    for bs in ("1", "4"):
        if command == "inpaint":
            rc = _inpaint(
                files, tmp_path / bs, "--batch-size", bs, "--resample", "2", "--jump", "2"
            )
        elif command == "inpaint-unipc":
            rc = _inpaint(files, tmp_path / bs, "--batch-size", bs, "--sampler", "unipc",
                          "--grid", "karras")  # fmt: skip
        else:
            rc = _edit(files, tmp_path / bs, "--batch-size", bs, "--strength", "0.6",
                       "--sampler", "ddpm")  # fmt: skip
        assert rc == 0
    diff = np.abs(_edits(tmp_path / "1").astype(int) - _edits(tmp_path / "4").astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float32 kernels per batch size


def test_resume_keeps_finished_batches(files, tmp_path):
    out = tmp_path / "run"
    assert _inpaint(files, out, "--batch-size", "2") == 0
    first = _edits(out)
    (out / "batches" / "batch_000001.npz").unlink()
    assert _inpaint(files, out, "--batch-size", "2") == 2  # needs --resume
    assert _inpaint(files, out, "--batch-size", "2", "--resume") == 0
    np.testing.assert_array_equal(_edits(out), first)
    assert _inpaint(files, out, "--batch-size", "2", "--seed", "1", "--resume") == 2


def test_folders_of_pngs_work_as_images_and_masks(files, tmp_path):
    images = np.load(files["images"])["arr_0"]
    (tmp_path / "im").mkdir()
    (tmp_path / "mk").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "im" / f"{i}.png")
    Image.fromarray(np.load(files["left"])["arr_0"][0]).save(tmp_path / "mk" / "m.png")
    argv = ["inpaint", "--checkpoint", str(files["model"]), "--images", str(tmp_path / "im"),
            "--masks", str(tmp_path / "mk"), "--steps", "3", "--out", str(tmp_path / "o"),
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    np.testing.assert_array_equal(_edits(tmp_path / "o")[:, :, :16], images[:, :, :16])


def _edit(files, out: Path, *extra: str) -> int:
    argv = ["edit", "--checkpoint", str(files["model"]), "--images", str(files["images"]),
            "--steps", "6", "--out", str(out), "--no-progress"]  # fmt: skip
    return cli.main([*argv, *extra])


def test_strength_zero_returns_the_input_and_guided_edits_run(files, tmp_path):
    assert _edit(files, tmp_path / "zero", "--strength", "0") == 0
    np.testing.assert_array_equal(_edits(tmp_path / "zero"), np.load(files["images"])["arr_0"])
    assert _edit(files, tmp_path / "g", "--strength", "0.5", "--sampler", "dpm++2m",
                 "--classifier", str(files["classifier"]), "--classifier-scale", "4",
                 "--classes", "7") == 0  # fmt: skip
    assert np.load(tmp_path / "g" / "edits_4x32x32x3.npz")["arr_1"].tolist() == [7] * 4
    settings = json.loads((tmp_path / "g" / "settings.json").read_text())
    assert settings["nfe"] == 3 and settings["job"]["strength"] == 0.5


def _bad_files(files) -> dict[str, Path]:
    root = files["root"]
    named = {"M8": root / "m8.npz", "MRGB": root / "mrgb.npz", "M01": root / "m01.npz",
             "SMALL": root / "small.npz", "LEFT": files["left"],
             "CLF": files["classifier"]}  # fmt: skip
    np.savez(named["M8"], np.full((1, 8, 8), 255, np.uint8))
    np.savez(named["MRGB"], np.full((1, 32, 32, 3), 255, np.uint8))
    np.savez(named["M01"], np.ones((1, 32, 32), np.uint8))
    np.savez(named["SMALL"], np.zeros((2, 16, 16, 3), np.uint8))
    named["NPY"], named["JUNK"] = root / "images.npy", root / "junk.npz"
    np.save(named["NPY"], np.zeros((2, 32, 32, 3), np.uint8))
    named["JUNK"].write_text("not an npz")
    return named


def _bad_argv(files, command: str, extra, out: Path) -> list[str]:
    named = _bad_files(files)
    extra = [str(named.get(e, e)) for e in extra]
    return [command, "--checkpoint", str(files["model"]), "--images", str(files["images"]),
            "--steps", "4", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("inpaint", ("--masks", "M8"), "--masks: masks are 8x8, the images 32x32"),
        ("inpaint", ("--masks", "MRGB"), "a mask has one channel (grey, white = keep), these "
         "have 3"),
        ("inpaint", ("--masks", "M01"), "hold only 0 and 1"),
        ("inpaint", (), "adm inpaint needs --masks"),
        ("inpaint", ("--masks", "LEFT", "--resample", "2", "--jump", "9"),
         "--jump 9 must be smaller than the number of steps (4)"),
        ("inpaint", ("--masks", "LEFT", "--jump", "5"), "--jump 5 must be smaller than the"),
        ("inpaint", ("--masks", "LEFT", "--resample", "0"), "--resample must be at least 1"),
        ("inpaint", ("--masks", "LEFT", "--sampler", "ddpm", "--eta", "0.5"),
         "sampler 'ddpm' has no option --eta"),
        ("inpaint", ("--masks", "LEFT", "--sampler", "dpm++2m", "--resample", "10"),
         "--resample 10: RePaint's resampling runs with ddpm or ddim; --sampler dpm++2m does "
         "replacement only (--resample 1)"),
        ("inpaint", ("--masks", "LEFT", "--sampler", "heun"), "--sampler heun: inpainting runs "
         "with ddpm, ddim, dpm++2m, dpm++3m, dpm++2m-sde, unipc"),
        ("inpaint", ("--masks", "LEFT", "--sampler", "dpm++2m", "--grid", "karras", "--steps",
                     "ddim4"), "with a grid, steps is a number of steps"),
        ("edit", ("--strength", "0.1", "--sampler", "heun"), "'heun' needs at least 2 steps"),
        ("inpaint", ("--masks", "LEFT", "--images", "SMALL"), "images are 16x16x3, but the model"),
        ("inpaint", ("--masks", "LEFT", "--classes", "2"), "the model is unconditional"),
        ("inpaint", ("--masks", "LEFT", "--classifier", "CLF"), "--classes is needed to guide"),
        ("inpaint", ("--masks", "missing.npz"), "--masks missing.npz: no such file or folder"),
        ("edit", ("--strength", "0.5", "--images", "NPY"), "expected an .npz (arr_0) or a folder"),
        ("inpaint", ("--masks", "JUNK"), "junk.npz: not a readable .npz"),
        ("edit", ("--strength", "1.5"), "--strength must be in [0, 1], got 1.5"),
        ("edit", ("--strength", "-0.1"), "--strength must be in [0, 1], got -0.1"),
        ("edit", ("--strength", "nan"), "--strength must be in [0, 1], got nan"),
        ("edit", ("--strength", "0.5", "--steps", "ddim4"), "adm edit takes a number of steps"),
        ("edit", ("--strength", "0.5", "--images", "SMALL"), "images are 16x16x3"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line_before_any_work(files, tmp_path, capsys, command, extra,
                                                     message):  # fmt: skip
    out = tmp_path / "bad"
    assert cli.main(_bad_argv(files, command, extra, out)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (out / "batches").exists() or not any((out / "batches").iterdir())


def test_a_bad_mask_from_the_shell_exits_2_with_one_line(files, tmp_path):
    argv = _bad_argv(files, "inpaint", ("--masks", "MRGB"), tmp_path / "bad")
    cmd = [sys.executable, "-m", "adm.cli.main", *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "a mask has one channel" in result.stderr and not (tmp_path / "bad" / "batches").exists()


def test_classifier_free_guidance_inpaints_a_class_conditional_model(files, tmp_path):
    model = _save("tiny_diffusion", files["root"] / "cond.safetensors", 4, num_classes=11)
    argv = ["inpaint", "--checkpoint", str(model), "--images", str(files["images"]),
            "--masks", str(files["left"]), "--steps", "3", "--cfg-scale", "3", "--classes", "2,9",
            "--sampler", "ddim", "--out", str(tmp_path / "o"), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    out = np.load(tmp_path / "o" / "edits_4x32x32x3.npz")
    assert out["arr_1"].tolist() == [2, 9, 2, 9]
    np.testing.assert_array_equal(
        out["arr_0"][:, :, :16], np.load(files["images"])["arr_0"][:, :, :16]
    )
    settings = json.loads((tmp_path / "o" / "settings.json").read_text())
    assert settings["job"]["cfg_scale"] == 3.0
    # the null label (10, the last) is not a class to guide towards
    argv[argv.index("2,9")] = "10"
    assert cli.main([*argv[:-3], "--out", str(tmp_path / "bad")]) == 2
