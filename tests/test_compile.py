"""`--compile` (torch.compile) of adm sample, sweep and train*: the flag reaches the networks and
the compile time is reported; compiled sampling gives the eager samples (slow)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adm._util import runtime
from adm.cli import sweep_subjects
from adm.cli.main import main
from adm.models import checkpoint, presets
from adm.nets.classifier import NoisyClassifier
from adm.nets.unet import UNet
from conftest import randomize


@pytest.fixture
def fake_compile(monkeypatch) -> list[torch.nn.Module]:
    """torch.compile replaced by a recorder that returns the module itself (nothing compiles)."""
    seen: list[torch.nn.Module] = []

    def record(model: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
        seen.append(model)
        return model

    monkeypatch.setattr(torch, "compile", record)
    return seen


def _save(name: str, path: Path, **network_changes: object) -> Path:
    preset = presets.get_preset(name)
    preset = dataclasses.replace(
        preset, network=dataclasses.replace(preset.network, **network_changes)
    )
    return checkpoint.save_model(randomize(presets.build_model(preset)), preset, path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    model = _save("tiny_diffusion", root / "model.safetensors", num_classes=10)
    return model, _save("tiny_classifier", root / "clf.safetensors", out_channels=10)


def _sample(ckpts: tuple[Path, Path], out: Path, *extra: str) -> int:
    return main(["sample", "--checkpoint", str(ckpts[0]), "--classifier", str(ckpts[1]),
                 "--classifier-scale", "1", "--out", str(out), "--no-progress", "--steps", "3",
                 "--num-samples", "2", "--batch-size", "2", *extra])  # fmt: skip


def test_compile_model_reports_the_first_call_once(fake_compile) -> None:
    messages: list[str] = []
    net = torch.nn.Linear(2, 2)
    compiled = runtime.compile_model(net, label="net", report=messages.append)
    compiled(torch.zeros(1, 2))
    compiled(torch.zeros(1, 2))
    assert fake_compile == [net]
    assert len(messages) == 1 and messages[0].startswith("net: torch.compile: the first call")
    assert not net._forward_hooks and not net._forward_pre_hooks  # the timer removed itself


def test_sample_compile_reaches_model_and_classifier(ckpts, tmp_path, fake_compile, capsys):
    assert _sample(ckpts, tmp_path / "run", "--compile") == 0
    assert [type(m) for m in fake_compile] == [UNet, NoisyClassifier]
    err = capsys.readouterr().err
    assert "model: torch.compile: the first call" in err
    assert "classifier: torch.compile: the first call" in err


def test_sweep_compile_reaches_the_checkpoint_models(ckpts, fake_compile, capsys) -> None:
    inputs = sweep_subjects.CheckpointInputs(str(ckpts[0]), str(ckpts[1]), "unused.npz")
    models = sweep_subjects.load_checkpoint_models(inputs, torch.device("cpu"), compile=True)
    assert [type(m) for m in fake_compile] == [UNet, NoisyClassifier]
    assert models.model is fake_compile[0] and models.classifier is fake_compile[1]
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    assert "--compile" in capsys.readouterr().out


def test_train_compile_and_attention_checkpointing_reach_the_network(
    tmp_path, fake_compile, capsys
) -> None:
    data = tmp_path / "imgs"
    data.mkdir()
    for i, name in enumerate(("a_0", "b_0")):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(data / f"{name}.png")
    argv = ["train", "--preset", "tiny_diffusion", "--data", str(data), "--out",
            str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--no-progress",
            "--set", "unet.image_size=8", "--set", "unet.channel_mult=1,2",
            "--set", "unet.attention_ds=2", "--compile", "--checkpoint-attention"]  # fmt: skip
    assert main(argv) == 0
    assert [type(m) for m in fake_compile] == [UNet]
    assert fake_compile[0].middle_block[1].checkpoint_attention
    assert "network: torch.compile: the first call" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_sampling_gives_the_eager_samples(ckpts, tmp_path) -> None:
    assert _sample(ckpts, tmp_path / "eager") == 0
    assert _sample(ckpts, tmp_path / "compiled", "--compile") == 0
    eager, compiled = (
        np.load(tmp_path / d / "samples_2x32x32x3.npz") for d in ("eager", "compiled")
    )
    # uint8 images: a compiled kernel's rounding may flip a pixel by one level, never more.
    diff = np.abs(eager["arr_0"].astype(int) - compiled["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.array_equal(eager["arr_1"], compiled["arr_1"])
