"""`adm train*` commands: dry runs, the original's flags, and clear errors for bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adm.cli.main import main

SMALL = ["--set", "unet.image_size=16", "--set", "unet.channel_mult=1,2",
         "--set", "unet.attention_ds=2", "--set", "diffusion.steps=100"]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _folder(root: Path, classes=("a", "b"), per_class: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(classes):
        for i in range(per_class):
            arr = np.full((12, 12, 3), 40 * (c + 1), dtype=np.uint8)
            Image.fromarray(arr).save(root / f"{name}_{i}.png")
    return root


def test_dry_run_prints_the_resolved_config(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path / "imgs")
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny_diffusion", *SMALL, "--data", str(data), "--out", str(out),
            "--steps", "5", "--fit-classes", "--label-dropout", "0.1", "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["preset"]["network"]["num_classes"] == 3  # 2 classes + the null label
    assert resolved["data"]["class_names"] == ["a", "b"] and resolved["data"]["null_label"] == 2
    assert resolved["train"]["steps"] == 5 and resolved["train"]["ema_rates"] == [0.9999]
    assert not out.exists()


def test_original_flag_names_are_accepted(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path / "imgs")
    argv = ["train", "--data_dir", str(data), "--out", str(tmp_path / "run"), "--dry-run",
            "--lr_anneal_steps", "7", "--batch_size", "2", "--ema_rate", "0.999,0.9",
            "--lr", "3e-4", "--schedule_sampler", "loss-second-moment", "--microbatch", "-1",
            "--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1",
            "--channel_mult", "1,2", "--attention_resolutions", "8", "--learn_sigma", "True",
            "--diffusion_steps", "100", "--use_fp16", "True"]  # fmt: skip
    assert main(argv) == 0
    resolved = json.loads(capsys.readouterr().out)
    train = resolved["train"]
    assert (train["steps"], train["anneal_lr"], train["batch_size"]) == (7, True, 2)
    assert train["ema_rates"] == [0.999, 0.9] and train["lr"] == 3e-4
    assert train["timestep_sampler"] == "loss-second-moment" and train["microbatch"] is None
    assert train["precision"] == "fp16"
    net, diffusion = resolved["preset"]["network"], resolved["preset"]["diffusion"]
    assert (net["model_channels"], net["out_channels"], net["attention_ds"]) == (32, 6, [2])
    assert diffusion["steps"] == 100 and diffusion["var_type"] == "learned_range"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "no images"),
        ("one_class", "at least 2 classes, found 1"),
        ("wrong_kind", "is a diffusion preset: use `adm train`"),
        ("no_steps", "pass --steps"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys, case: str, message: str) -> None:
    (tmp_path / "empty").mkdir()
    _folder(tmp_path / "one", classes=("cat",))
    data = {"empty": "empty", "one_class": "one"}.get(case, "one")
    command = "train-classifier" if case == "wrong_kind" else "train"
    argv = [command, "--preset", "tiny_diffusion", "--data", str(tmp_path / data),
            "--out", str(tmp_path / "run")]  # fmt: skip
    argv += [] if case == "no_steps" else ["--steps", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_corrupt_image_stops_or_is_skipped(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path / "imgs")
    (data / "a_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    base = ["train", "--preset", "tiny_diffusion", *SMALL, "--data", str(data), "--steps", "2",
            "--batch-size", "7", "--set", "unet.num_classes=none", "--no-progress"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "r1")]) == 1
    assert "a_broken.png" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "r2"), "--skip-bad-images"]) == 0
    with open(tmp_path / "r2" / "log.csv", newline="") as f:
        assert [row["bad_images"] for row in csv.DictReader(f)] == ["1"]


def test_classifier_and_superres_commands_run(tmp_path: Path) -> None:
    data = _folder(tmp_path / "imgs", per_class=4)
    clf = ["train-classifier", "--preset", "tiny_classifier", "--data", str(data),
           "--out", str(tmp_path / "clf"), "--steps", "2", "--batch-size", "4", "--fit-classes",
           "--eval-interval", "2", "--no-progress"]  # fmt: skip
    clf += [a.replace("unet.", "classifier.") for a in SMALL[:6]]
    assert main(clf) == 0
    assert (tmp_path / "clf" / "model_000002.safetensors").is_file()
    sr = ["train-superres", "--preset", "tiny_upsampler", "--data", str(data),
          "--out", str(tmp_path / "sr"), "--steps", "1", "--batch-size", "2",
          "--set", "unet.image_size=16", "--set", "small_size=8", "--no-progress",
          "--set", "unet.num_classes=none"]  # fmt: skip
    assert main(sr) == 0
    # A different model in the same run folder is refused, not silently mixed.
    assert main([*sr[:-2], "--set", "unet.num_classes=5", "--fit-classes"]) == 1


def test_resume_with_other_data_or_recipe_is_refused_naming_each_difference(tmp_path, capsys):
    """A rerun in the same --out with other data, batch size or seed is not a resume of that run:
    refused in one line that names each difference (config.json untouched); --force continues
    and notes the changes; more --steps is allowed."""
    data = _folder(tmp_path / "imgs", per_class=3)
    out = tmp_path / "run"
    base = ["train", "--preset", "tiny_diffusion", *SMALL, "--set", "unet.num_classes=none",
            "--out", str(out), "--no-progress", "--batch-size", "2"]  # fmt: skip
    assert main([*base, "--data", str(data), "--steps", "1"]) == 0
    config = (out / "config.json").read_text()
    other = _folder(tmp_path / "other", per_class=4)
    assert main([*base, "--data", str(other), "--steps", "2", "--seed", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{out} holds a run with other settings (train.seed: 0 -> 3; data.items: " in err
    assert "data.fingerprint: " in err and "pass --force to continue it with these" in err
    assert (out / "config.json").read_text() == config
    assert main([*base, "--data", str(data), "--steps", "2", "--batch-size", "3"]) == 1
    assert "(train.batch_size: 2 -> 3)" in capsys.readouterr().err
    assert main([*base, "--data", str(data), "--steps", "2"]) == 0  # longer: allowed
    assert main([*base, "--data", str(other), "--steps", "3", "--force"]) == 0
    notes = json.loads((out / "config.json").read_text())["notes"]
    assert any(n.startswith("--force: continuing with data.items: 6 -> 8") for n in notes), notes


def test_classes_from_file_fixes_the_label_indices(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path / "imgs")  # classes a, b
    names = tmp_path / "names.txt"
    names.write_text("z\nb\na\n")
    argv = ["train", "--preset", "tiny_diffusion", *SMALL, "--data", str(data), "--dry-run",
            "--out", str(tmp_path / "r"), "--steps", "1", "--classes-from", str(names)]  # fmt: skip
    assert main(argv) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["data"]["class_names"] == ["z", "b", "a"]
    names.write_text("z\nb\n")
    assert main(argv) == 2
    assert "classes ['a'] are not in the class map" in capsys.readouterr().err


def test_extending_an_annealed_run_says_what_the_lr_does(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path / "imgs")
    base = ["train", "--preset", "tiny_diffusion", *SMALL, "--data", str(data), "--lr", "1e-3",
            "--out", str(tmp_path / "run"), "--batch-size", "2", "--save-interval", "2",
            "--set", "unet.num_classes=none", "--ema-rate", "0.9", "--log-interval", "1",
            "--no-progress"]  # fmt: skip
    assert main([*base, "--steps", "2", "--anneal-lr"]) == 0
    capsys.readouterr()
    # Forgetting --anneal-lr on the rerun would jump back up to --lr: refused in one line.
    assert main([*base, "--steps", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("adm train: error: ") and err.count("\n") == 1, err
    assert "trained with --anneal-lr (5.00e-04 at step 1)" in err and "--init-from" in err
    assert main([*base, "--steps", "6", "--anneal-lr"]) == 0
    out = capsys.readouterr().out
    assert "at step 2 of 6 (was 2): --anneal-lr continues linearly to 0 at step 6" in out
    assert "the LR rises from 5.00e-04 (step 1) to 6.67e-04" in out
    with open(tmp_path / "run" / "log.csv", newline="") as f:
        lrs = [float(row["lr"]) for row in csv.DictReader(f)]
    assert lrs == pytest.approx([1e-3, 5e-4, 2e-3 / 3, 5e-4, 1e-3 / 3, 1e-3 / 6], rel=1e-5)


_PRESETS = {"train": "tiny_diffusion", "train-classifier": "tiny_classifier",
            "train-superres": "tiny_upsampler"}  # fmt: skip


@pytest.mark.parametrize("command", list(_PRESETS))
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--batch-size", "-2"], "--batch-size must be at least 1, got -2"),
        (["--batch_size", "0"], "--batch-size must be at least 1, got 0"),  # the original's flag
        (["--batch_size", "two"], "--batch_size 'two': expected a number"),
        (["--microbatch", "0"], "--microbatch must be at least 1 (or -1: all), got 0"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--save-interval", "0"], "--save-interval must be at least 1, got 0"),
        (["--log-interval", "-1"], "--log-interval must be at least 1, got -1"),
        (["--keep", "0"], "--keep must be at least 1, got 0"),
        (["--workers", "-1"], "--workers must be at least 0, got -1"),
        (["--seed", "-1"], "--seed must be at least 0, got -1"),
        (["--ema-rate", "fast"], "--ema-rate 'fast': expected rates like"),
        (["--out", "/proc/adm/run"], "cannot create run folder /proc/adm/run: /proc does not"),
        (["--out", "BLOCKER"], "cannot create run folder BLOCKER: it is a file, not a folder"),
        (["--out", "BLOCKER/run"], "cannot create run folder BLOCKER/run: BLOCKER is a file"),
    ],
)
def test_bad_counts_and_run_folders_are_one_line_before_any_work(
    tmp_path: Path, capsys, monkeypatch, command: str, extra: list[str], message: str
) -> None:
    data = _folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    Path("BLOCKER").write_text("a file where a folder should be")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [command, "--preset", _PRESETS[command], "--data", str(data), "--out", "run",
            "--steps", "1", "--no-progress", *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"adm {command}: error: ") and message in err, err
    assert err.count("\n") == 1 and "Errno" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
