"""Training: timestep samplers, EMA, checkpoint files, and short real runs of all three kinds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adm.cli import main as cli
from adm.diffusion.resample import LossSecondMomentSampler, UniformSampler, create_sampler
from adm.models import checkpoint
from adm.models.overrides import apply_overrides
from adm.models.presets import build_model, get_preset
from adm.training import loop as trainlib
from adm.training import state as train_state

SMALL_UNET = ["unet.image_size=16", "unet.channel_mult=1,2", "unet.attention_ds=2"]
SMALL_CLASSIFIER = [s.replace("unet.", "classifier.") for s in SMALL_UNET]


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: one intra-op thread is several times faster than oversubscribing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_folder(root: Path, per_class: int = 8, classes=("red", "green", "blue")) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(classes):
        for i in range(per_class):
            arr = (rng.random((20, 24, 3)) * 60).astype(np.uint8)
            arr[..., c] += 150
            Image.fromarray(arr).save(root / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"), per_class=12)


def small_preset(name: str = "tiny_diffusion", *extra: str):
    shape = SMALL_CLASSIFIER if name == "tiny_classifier" else SMALL_UNET
    if name == "tiny_upsampler":
        shape = ["unet.image_size=16", "small_size=8"]
    return apply_overrides(get_preset(name), [*shape, *extra])


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---- timestep samplers ------------------------------------------------------------------------


def test_uniform_sampler_draws_all_timesteps_with_unit_weights() -> None:
    t, w = UniformSampler(10).sample(2000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and set(t.tolist()) == set(range(10))
    assert torch.equal(w, torch.ones(2000))


def test_loss_second_moment_sampler_weights_and_state() -> None:
    s = create_sampler("loss-second-moment", 4)
    assert isinstance(s, LossSecondMomentSampler)
    for _ in range(9):
        s.update(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(s.weights(), np.ones(4))  # not warmed up: uniform
    s.update(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    expected = np.array([1, 2, 3, 4]) / 10 * 0.999 + 0.001 / 4  # sqrt(E[L²]) normalised + 0.1%
    np.testing.assert_allclose(s.weights(), expected)
    t, w = s.sample(4000, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(w.numpy(), 1 / (4 * expected[t.numpy()]), rtol=1e-6)
    assert abs((t == 3).float().mean().item() - expected[3]) < 0.03
    s.update(torch.tensor([0]), torch.tensor([5.0]))  # history shifts out the oldest value
    assert s.loss_history[0, -1] == 5.0 and s.loss_counts[0] == 10
    clone = LossSecondMomentSampler(4)
    clone.load_state_dict(s.state_dict())
    np.testing.assert_array_equal(clone.weights(), s.weights())
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        create_sampler("importance", 4)


# ---- EMA and checkpoint files -----------------------------------------------------------------


def test_ema_follows_the_original_update() -> None:
    model = torch.nn.Linear(2, 1)
    ema = train_state.EMA(model, [0.5, 0.9])
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model.parameters())
    for rate in (0.5, 0.9):
        sd = ema.state_dict(model, rate)
        for s0, name in zip(start, ("weight", "bias"), strict=True):
            torch.testing.assert_close(sd[name], rate * s0 + (1 - rate) * (s0 + 1))


def test_checkpoint_steps_prune_and_atomic_write(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        train_state.save_state(tmp_path, step, {"x": torch.ones(1) * step})
        (tmp_path / f"model_{step:06d}.safetensors").write_bytes(b"w")
    (tmp_path / "model_000008.safetensors").write_bytes(b"w")  # no state file: incomplete
    assert train_state.checkpoint_steps(tmp_path) == [2, 4, 6]
    train_state.prune(tmp_path, keep=2)
    assert train_state.checkpoint_steps(tmp_path) == [4, 6]
    assert not (tmp_path / "model_000002.safetensors").exists()
    assert train_state.load_state(tmp_path, 6)["x"].item() == 6

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        train_state.atomic_write(tmp_path / "state_000010.pt", failing)
    assert train_state.checkpoint_steps(tmp_path) == [4, 6]
    assert not list(tmp_path.glob(".*tmp"))


# ---- real runs --------------------------------------------------------------------------------


def test_diffusion_loss_falls_and_files_are_written(images: Path, tmp_path: Path) -> None:
    cfg = trainlib.TrainConfig(
        steps=24, batch_size=8, lr=2e-3, log_interval=8, save_interval=16, keep=1,
        ema_rates=(0.9, 0.99), sample_interval=24, num_samples=4, sample_steps="ddim4",
        progress=False,
    )  # fmt: skip
    preset = small_preset("tiny_diffusion", "diffusion.steps=100")
    setup = trainlib.prepare(
        preset, trainlib.DataSpec(str(images), fit_classes=True), tmp_path, cfg
    )
    assert setup.preset.network.num_classes == 3
    summary = trainlib.train(setup)
    rows = read_log(tmp_path)
    assert [int(r["step"]) for r in rows] == [8, 16, 24]
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert last < 0.8 * first, (first, last)
    for key in ("mse", "vb", "loss_q0", "loss_q3", "grad_norm", "lr", "images_per_s"):
        assert np.isfinite(float(rows[-1][key])), key
    assert train_state.checkpoint_steps(tmp_path) == [24]  # keep=1
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "samples_000024.png").is_file()
    _, preset = checkpoint.load_model(tmp_path / "ema_0.99_000024.safetensors")
    assert preset.network.num_classes == 3
    assert json.loads((tmp_path / "classes.json").read_text())["class_names"] == [
        "blue", "green", "red",
    ]  # fmt: skip
    assert summary["step"] == 24 and summary["skipped_steps"] == 0
    # The same call again finds the run finished and does nothing.
    assert trainlib.train(setup)["finished_before"]


def test_classifier_beats_chance_on_held_out_images(images: Path, tmp_path: Path) -> None:
    cfg = trainlib.TrainConfig(
        steps=60, batch_size=16, lr=2e-3, ema_rates=(), random_crop=True, anneal_lr=True,
        eval_interval=30, eval_size=64, log_interval=10, save_interval=1000, progress=False,
    )  # fmt: skip
    spec = trainlib.DataSpec(str(images), fit_classes=True, val_fraction=0.34)
    setup = trainlib.prepare(small_preset("tiny_classifier"), spec, tmp_path, cfg)
    assert len(setup.val_source) == 12 and setup.preset.network.out_channels == 3
    summary = trainlib.train(setup)
    assert summary["val_acc1"] > 0.6, summary  # chance is 1/3
    assert summary["val_acc5"] == 1.0
    rows = read_log(tmp_path)
    assert rows[2]["val_acc1"] and not rows[0]["val_acc1"]  # evaluations at steps 30 and 60
    assert float(rows[-1]["lr"]) == pytest.approx(
        2e-3 / 60, rel=1e-5
    )  # linear anneal: lr·(1 − 59/60)


def test_superres_training_runs_with_class_labels(images: Path, tmp_path: Path) -> None:
    cfg = trainlib.TrainConfig(
        steps=3, batch_size=4, microbatch=2, log_interval=1, sample_interval=3, num_samples=2,
        sample_steps="ddim2", progress=False,
    )  # fmt: skip
    preset = small_preset("tiny_upsampler", "diffusion.steps=100")
    setup = trainlib.prepare(
        preset, trainlib.DataSpec(str(images), fit_classes=True), tmp_path, cfg
    )
    summary = trainlib.train(setup)
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    assert (tmp_path / "samples_000003.png").is_file()
    _, loaded = checkpoint.load_model(tmp_path / "model_000003.safetensors")
    assert loaded.kind == "superres" and loaded.small_size == 8


def test_non_finite_loss_is_skipped_then_stops(images: Path, tmp_path: Path, monkeypatch) -> None:
    from adm.training import step as train_step

    real = train_step.training_losses
    bad_steps: set[int] = {1}
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] - 1 in bad_steps:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_step, "training_losses", flaky)
    cfg = trainlib.TrainConfig(steps=4, batch_size=2, max_nonfinite=2, progress=False)
    preset = small_preset("tiny_diffusion", "diffusion.steps=100", "unet.num_classes=none")
    setup = trainlib.prepare(preset, trainlib.DataSpec(str(images)), tmp_path / "a", cfg)
    summary = trainlib.train(setup)
    assert summary["step"] == 4 and summary["skipped_steps"] == 1
    bad_steps.update(range(100))
    setup = trainlib.prepare(preset, trainlib.DataSpec(str(images)), tmp_path / "b", cfg)
    with pytest.raises(trainlib.TrainingError, match="non-finite loss at 2 consecutive steps"):
        trainlib.train(setup)


def test_label_dropout_uses_the_last_label_as_null(images: Path, tmp_path: Path) -> None:
    cfg = trainlib.TrainConfig(steps=1, label_dropout=0.2, progress=False)
    preset = small_preset("tiny_diffusion", "diffusion.steps=100")
    setup = trainlib.prepare(
        preset, trainlib.DataSpec(str(images), fit_classes=True), tmp_path, cfg
    )
    assert setup.preset.network.num_classes == 4 and setup.null_label == 3
    assert setup.preset.sampling.null_label == 3  # saved with the weights, for sampling
    trainlib.train(setup)
    # Sampled without --cfg-scale, the null label is not drawn as a class, nor accepted as one.
    ckpt, out = str(tmp_path / "model_000001.safetensors"), tmp_path / "samples"
    argv = ["sample", "--checkpoint", ckpt, "--num-samples", "24", "--steps", "1", "--out",
            str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    labels = np.load(next(out.glob("samples_*.npz")))["arr_1"]
    assert set(labels.tolist()) == {0, 1, 2}
    assert cli.main([*argv[:-3], str(tmp_path / "s3"), "--classes", "3"]) == 2
    setup = trainlib.prepare(preset, trainlib.DataSpec(str(images)), tmp_path / "b", cfg)
    assert setup.null_label == 999
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        trainlib.prepare(
            apply_overrides(preset, ["unet.num_classes=none"]),
            trainlib.DataSpec(str(images)), tmp_path, cfg,
        )  # fmt: skip


def test_fine_tuning_starts_from_the_checkpoint(images: Path, tmp_path: Path) -> None:
    preset = small_preset("tiny_diffusion", "diffusion.steps=100", "unet.num_classes=3")
    torch.manual_seed(5)
    start = build_model(preset)
    checkpoint.save_model(start, preset, tmp_path / "start.safetensors")
    cfg = trainlib.TrainConfig(steps=1, batch_size=2, lr=1e-6, ema_rates=(0.5,), progress=False)
    setup = trainlib.prepare(
        preset, trainlib.DataSpec(str(images)), tmp_path / "run", cfg,
        init_from=str(tmp_path / "start.safetensors"),
    )  # fmt: skip
    trainlib.train(setup)
    tuned = checkpoint.load_state_dict(tmp_path / "run" / "model_000001.safetensors")
    for name, p in start.state_dict().items():
        torch.testing.assert_close(tuned[name], p, atol=2e-6, rtol=0)  # one step of lr 1e-6


def test_label_dropout_replaces_labels_at_the_given_rate(images: Path, tmp_path, monkeypatch):
    from adm.training import step as train_step

    seen: list[torch.Tensor] = []
    real = train_step.training_losses

    def spy(*args, model_kwargs=None, **kwargs):
        seen.append(model_kwargs["y"].clone())
        return real(*args, model_kwargs=model_kwargs, **kwargs)

    monkeypatch.setattr(train_step, "training_losses", spy)
    cfg = trainlib.TrainConfig(steps=4, batch_size=16, label_dropout=0.5, progress=False)
    preset = small_preset("tiny_diffusion", "diffusion.steps=100")
    spec = trainlib.DataSpec(str(images), fit_classes=True)
    trainlib.train(trainlib.prepare(preset, spec, tmp_path, cfg))
    labels = torch.cat(seen)
    null = (labels == 3).float().mean().item()
    assert set(labels.tolist()) == {0, 1, 2, 3} and 0.3 < null < 0.7


# ---- the LR schedule on resume ------------------------------------------------------------------


def test_lr_schedule_is_the_original_anneal_and_resume_notes_say_what_changes() -> None:
    from adm.training.lr import LRSchedule, ScheduleConflict, resume_note

    run = LRSchedule(1e-3, 4, anneal=True)
    assert [run.at(s) for s in range(4)] == [1e-3 * (1 - s / 4) for s in range(4)]  # bitwise
    assert resume_note(run, run, 2) is None  # a plain resume: nothing changes
    longer = LRSchedule(1e-3, 8, anneal=True)
    assert resume_note(run, longer, 4) == (
        "at step 4 of 8 (was 4): --anneal-lr continues linearly to 0 at step 8, lr·(1 − step/8) "
        "as if the run had been started with --steps 8 and --lr 0.001; the LR rises from "
        "2.50e-04 (step 3) to 5.00e-04"
    )
    assert "falls from 8.75e-04 (step 1) to 6.67e-04" in resume_note(
        longer, LRSchedule(1e-3, 6, True), 2
    )
    assert resume_note(run, longer, 8) is None  # nothing left to train
    with pytest.raises(ScheduleConflict, match="resume with --anneal-lr"):
        resume_note(run, LRSchedule(1e-3, 8, anneal=False), 4)
    constant = LRSchedule(1e-3, 4, anneal=False)
    assert resume_note(constant, LRSchedule(1e-3, 8, False), 4).endswith(
        "stays constant at 1.00e-03"
    )
    assert resume_note(constant, LRSchedule(2e-3, 4, False), 2).endswith(
        "from 1.00e-03 to 2.00e-03"
    )
    assert "--anneal-lr starts linearly to 0 at step 8" in resume_note(constant, longer, 4)


def _spy_lrs(monkeypatch) -> list[tuple[int, float]]:
    """(step, LR) of every optimisation step, as passed to the optimizer."""
    from adm.training import step as train_step

    seen: list[tuple[int, float]] = []
    real = train_step.Trainer._optimise

    def spy(self, stats, lr):
        seen.append((self.step, lr))
        assert all(g["lr"] == lr for g in self.opt.param_groups)
        return real(self, stats, lr)

    monkeypatch.setattr(train_step.Trainer, "_optimise", spy)
    return seen


def test_extending_an_annealed_run_continues_the_anneal_over_the_new_total(
    images: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import dataclasses

    seen = _spy_lrs(monkeypatch)
    preset = small_preset("tiny_diffusion", "diffusion.steps=100", "unet.num_classes=none")
    cfg = trainlib.TrainConfig(
        steps=4, batch_size=2, lr=1e-3, anneal_lr=True, ema_rates=(0.9,), log_interval=1,
        save_interval=2, keep=10, progress=False,
    )  # fmt: skip

    def run(**changes):
        config = dataclasses.replace(cfg, **changes)
        return trainlib.train(
            trainlib.prepare(preset, trainlib.DataSpec(str(images)), tmp_path, config)
        )

    run()
    assert seen == [(s, 1e-3 * (1 - s / 4)) for s in range(4)]
    config_before = (tmp_path / "config.json").read_bytes()
    # Dropping --anneal-lr would jump back up to the full LR: refused, the run folder untouched.
    with pytest.raises(trainlib.TrainingError, match="resume with --anneal-lr"):
        run(steps=8, anneal_lr=False)
    assert (tmp_path / "config.json").read_bytes() == config_before
    # A state file from before the schedule was recorded: the previous config.json tells it.
    state = train_state.load_state(tmp_path, 4)
    del state["lr_schedule"]
    torch.save(state, train_state.state_path(tmp_path, 4))
    capsys.readouterr()
    seen.clear()
    run(steps=8)
    # The anneal continues over the new total: lr·(1 − s/8) from step 4 on (up from 2.5e-4).
    assert seen == [(s, 1e-3 * (1 - s / 8)) for s in range(4, 8)]
    assert [lr for _, lr in seen] == pytest.approx([5e-4, 3.75e-4, 2.5e-4, 1.25e-4], rel=1e-15)
    out = capsys.readouterr().out
    line = f"resuming {tmp_path} at step 4 of 8 (was 4): --anneal-lr continues linearly to 0"
    assert line in out and "rises from 2.50e-04 (step 3) to 5.00e-04" in out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["lr_schedule"] == {"lr": 1e-3, "total": 8, "anneal": True}
    (change,) = config["lr_changes"]
    assert change["step"] == 4 and change["note"].startswith("at step 4 of 8 (was 4)")
    assert "resumed " + change["note"] in config["notes"]
    assert train_state.load_state(tmp_path, 8)["lr_schedule"]["total"] == 8
    assert [float(r["lr"]) for r in read_log(tmp_path)] == pytest.approx(
        [1e-3, 7.5e-4, 5e-4, 2.5e-4, 5e-4, 3.75e-4, 2.5e-4, 1.25e-4], rel=1e-6
    )
    # A plain resume of the extended run (unchanged --steps) is bitwise the uninterrupted one.
    final = checkpoint.load_state_dict(tmp_path / "model_000008.safetensors")
    for p in tmp_path.glob("*_000008.*"):
        p.unlink()
    seen.clear()
    run(steps=8)
    assert seen == [(6, 2.5e-4), (7, 1e-3 * (1 - 7 / 8))]
    assert "from step 6" in capsys.readouterr().out
    again = checkpoint.load_state_dict(tmp_path / "model_000008.safetensors")
    assert all(torch.equal(again[k], v) for k, v in final.items())
    assert len(json.loads((tmp_path / "config.json").read_text())["lr_changes"]) == 1


def test_extending_a_constant_lr_run_keeps_it_or_starts_the_anneal(
    images: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import dataclasses

    seen = _spy_lrs(monkeypatch)
    preset = small_preset("tiny_diffusion", "diffusion.steps=100", "unet.num_classes=none")
    cfg = trainlib.TrainConfig(
        steps=2, batch_size=2, lr=1e-3, ema_rates=(), save_interval=2, progress=False
    )

    def run(**changes):
        config = dataclasses.replace(cfg, **changes)
        trainlib.train(trainlib.prepare(preset, trainlib.DataSpec(str(images)), tmp_path, config))
        return capsys.readouterr().out

    run()
    assert "at step 2 of 4 (was 2): the LR stays constant at 1.00e-03" in run(steps=4)
    out = run(steps=8, anneal_lr=True)
    assert "at step 4 of 8 (was 4): --anneal-lr starts linearly to 0 at step 8" in out
    assert "falls from 1.00e-03 (step 3) to 5.00e-04" in out
    assert seen == [(0, 1e-3), (1, 1e-3), (2, 1e-3), (3, 1e-3)] + [
        (s, 1e-3 * (1 - s / 8)) for s in range(4, 8)
    ]


def test_a_non_finite_weight_stops_before_any_checkpoint_holds_it(images: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:  # fmt: skip
    """A finite loss and gradient whose update still overflows a weight (here forced at step 2)
    stops the run at that step, naming the tensor and the last good checkpoint; no file written
    holds a NaN or inf."""
    real_step = torch.optim.AdamW.step

    def overflowing(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        if overflowing.calls == 2:
            self.param_groups[0]["params"][3].data[0] = float("inf")
        overflowing.calls += 1
        return out

    overflowing.calls = 0
    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    cfg = trainlib.TrainConfig(steps=4, batch_size=2, save_interval=1, progress=False)
    preset = small_preset("tiny_diffusion", "diffusion.steps=100", "unet.num_classes=none")
    setup = trainlib.prepare(preset, trainlib.DataSpec(str(images)), tmp_path, cfg)
    name = [n for n, _ in build_model(setup.preset).named_parameters()][3]
    with pytest.raises(trainlib.TrainingError) as err:
        trainlib.train(setup)
    assert str(err.value).startswith(
        f"step 2: the optimizer step made weight {name} non-finite (NaN or inf)"
    )
    assert "Latest checkpoint: step 2." in str(err.value)
    assert train_state.checkpoint_steps(tmp_path) == [1, 2]
    for path in tmp_path.glob("*.safetensors"):
        assert all(t.isfinite().all() for t in checkpoint.load_state_dict(path).values()), path
