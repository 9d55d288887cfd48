"""Training loops of Dhariwal & Nichol 2021: the diffusion model (hybrid loss with learned Σ,
Nichol & Dhariwal 2021 §3.1), the noisy classifier (§4.1) and the super-resolution model
(§4, App. B), on torch.distributed (torchrun + DDP) and torch.amp instead of MPI and hand-written
fp16. `prepare(...)` resolves a run, `train(setup)` runs or continues it:

    setup = prepare(get_preset("tiny_diffusion"), DataSpec("imgs/"), "run", TrainConfig(steps=50))
    summary = train(setup)

The loop: one `Trainer.train_step` per global batch; every `log_interval` steps a CSV row (loss,
loss by timestep quartile, grad norm, LR, images/s), TensorBoard scalars when installed and the
progress bar; held-out top-1/top-5 for classifiers every `eval_interval`; an EMA sample grid
every `sample_interval`; a checkpoint (and the loss-curve PNG) every `save_interval` and at the
end. The same call on the same run folder after a kill continues the run.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from adm._util import dist, signals
from adm.data import datasets as datalib
from adm.diffusion.gaussian import Diffusion, q_sample
from adm.diffusion.samplers import ddim_sample
from adm.training.log import CSVLog, open_tensorboard, plot_curves, save_grid
from adm.training.setup import DataSpec, RunSetup, TrainConfig, load_class_map, prepare
from adm.training.step import Trainer, TrainingError, amp_dtype

__all__ = [
    "DataSpec",
    "RunSetup",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "amp_dtype",
    "evaluate_classifier",
    "load_class_map",
    "prepare",
    "sample_grid",
    "train",
]


def train(setup: RunSetup) -> dict[str, Any]:
    """Run (or continue, when the run folder holds checkpoints) the training of `setup`.
    Under torchrun every process calls this; returns a summary dict (final metrics, files)."""
    info = dist.setup(setup.config.device)
    try:
        return run(Trainer(setup, info))
    finally:
        dist.cleanup()


def _columns(trainer: Trainer) -> list[str]:
    quartiles = [f"loss_q{q}" for q in range(4)]
    cols = ["step", "samples", *trainer.columns, *quartiles, "grad_norm", "lr", "images_per_s"]
    cols += ["loss_scale", "skipped_steps", "bad_images"]
    if trainer.kind == "classifier":
        cols += ["val_loss", "val_acc1", "val_acc5"]
    return cols


def run(tr: Trainer) -> dict[str, Any]:
    """The loop over steps of an initialised `Trainer` (all ranks)."""
    cfg, main = tr.cfg, tr.info.is_main
    summary: dict[str, Any] = {}
    if tr.step >= cfg.steps:
        if main:
            tqdm.write(f"{tr.run_dir} already finished ({tr.step} of {cfg.steps} steps)")
        return {**tr.to_summary(), "finished_before": True}
    dataset = datalib.TrainingImages(
        tr.setup.source, tr.preset.image_size, random_crop=cfg.random_crop,
        random_flip=cfg.random_flip, channels=tr.preset.network.in_channels, seed=cfg.seed,
    )  # fmt: skip
    batches = datalib.loader(
        dataset, tr.plan, start_step=tr.step, workers=cfg.workers, skip_bad=True,
        pin_memory=tr.device.type == "cuda",
    )  # fmt: skip
    log = tb = None
    if main:
        log = CSVLog(tr.run_dir / "log.csv", _columns(tr), resume_step=tr.step or None)
        tb = open_tensorboard(tr.run_dir)
    bar = tqdm(total=cfg.steps, initial=tr.step, disable=not (main and cfg.progress), unit="step")
    clock, images, pending, plotted = time.perf_counter(), 0, {}, time.monotonic()
    try:
        while tr.step < cfg.steps:
            x, y, bad = next(batches)
            _note_bad_images(tr, bad)
            tr.train_step(x, y)
            images += cfg.batch_size
            bar.update(1)
            step, final = tr.step, tr.step == cfg.steps
            if tr.kind == "classifier" and (step % cfg.eval_interval == 0 or final):
                pending = evaluate_classifier(tr)
                summary.update(pending)
            if step % cfg.log_interval == 0 or final:
                row = {
                    **tr.meter.means(),
                    **pending,
                    "step": step,
                    "samples": step * cfg.batch_size,
                }
                row.update(images_per_s=images / (time.perf_counter() - clock))
                row.update(skipped_steps=tr.skipped, bad_images=len(tr.bad_images))
                _write_log(tr, log, tb, bar, row)
                summary.update(row)
                tr.meter.reset()
                pending, images, clock = {}, 0, time.perf_counter()
            grid_due = cfg.sample_interval and (step % cfg.sample_interval == 0 or final)
            if main and grid_due and tr.kind != "classifier":
                sample_grid(tr, tr.run_dir / f"samples_{step:06d}.png")
            if step % cfg.save_interval == 0 or final:
                tr.save()
                # The loss-curve PNG at the end and at checkpoints, at most once a minute.
                if main and (final or time.monotonic() - plotted > 60):
                    keys = ["val_loss"] if tr.kind == "classifier" else ["mse", "vb"]
                    plot_curves(log, tr.run_dir / "loss.png", ["loss", *keys])
                    plotted = time.monotonic()
                clock = time.perf_counter()
            if not final:
                _stop_if_signalled(tr, saved=step % cfg.save_interval == 0)
    finally:
        bar.close()
        if tb is not None:
            tb.close()
    return {**summary, **tr.to_summary()}


def _stop_if_signalled(tr: Trainer, saved: bool) -> None:
    """After a step: on SIGINT/SIGTERM (rank 0's decides, so every rank stops at the same step)
    save a checkpoint unless this step just did, and stop with `signals.Interrupted`."""
    sig = signals.requested()
    if tr.info.world_size > 1:
        sig = dist.broadcast_object(sig)
    if not sig:
        return
    if not saved:
        tr.save()
    raise signals.Interrupted(  # rank 0's signal, which this rank may not have received
        sig,
        f"stopped by {signals.name(sig)} at step {tr.step}: checkpoint saved in {tr.run_dir}; "
        "rerun the same command to resume",
    )


def _note_bad_images(tr: Trainer, bad: list[datalib.BadImage]) -> None:
    if bad and not tr.cfg.skip_bad_images:
        raise datalib.DataError(
            f"cannot read image {bad[0].name} ({bad[0].reason}); "
            "fix or remove it, or pass --skip-bad-images"
        )
    for item in bad:
        if item.name not in tr.bad_images:
            tr.bad_images.add(item.name)
            tqdm.write(f"skipping unreadable image {item.name} ({item.reason})")


def _write_log(tr: Trainer, log: CSVLog | None, tb: Any, bar: tqdm, row: dict) -> None:
    if log is None:
        return
    log.append(row)
    if tb is not None:
        for key, value in row.items():
            if key not in ("step", "samples"):
                tb.add_scalar(f"train/{key}", value, row["step"])
    shown = {"loss": f"{row.get('loss', float('nan')):.4g}", "img/s": f"{row['images_per_s']:.1f}"}
    if "val_acc1" in row:
        shown["val_acc1"] = f"{row['val_acc1']:.3f}"
    bar.set_postfix(shown)


@torch.no_grad()
def evaluate_classifier(tr: Trainer) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy on (up to `eval_size` items of) the held-out split, at
    uniformly drawn timesteps with fixed noise (so evaluations compare across steps). All ranks
    call it; each evaluates its share."""
    cfg, val, world = tr.cfg, tr.setup.val_source, tr.info.world_size
    n = min(cfg.eval_size, len(val)) // world * world if val is not None else 0
    if n == 0:
        return {}
    per, lo = n // world, tr.info.rank * (n // world)
    size, c = tr.preset.image_size, tr.preset.network.in_channels
    dataset = datalib.TrainingImages(val, size, random_flip=False, channels=c, seed=cfg.seed)
    gen = torch.Generator().manual_seed(dist.step_seed(cfg.seed, 0, 7))
    t_all = torch.randint(0, tr.diff.num_steps, (n,), generator=gen)
    noise_all = torch.randn((n, c, size, size), generator=gen)
    tr.model.eval()
    stats = []
    for i in range(lo, lo + per, cfg.microbatch or tr.plan.local_batch):
        j = min(i + (cfg.microbatch or tr.plan.local_batch), lo + per)
        x, y, _ = datalib.collate([dataset[(0, k)] for k in range(i, j)], skip_bad=True)
        x, y, t = x.to(tr.device), y.to(tr.device), t_all[i:j].to(tr.device)
        if not cfg.noised:
            t = torch.zeros_like(t)
        x_t = q_sample(tr.diff, x, t, noise_all[i:j].to(tr.device)) if cfg.noised else x
        with torch.autocast(tr.device.type, dtype=tr.amp, enabled=tr.amp is not None):
            logits = tr.model(x_t, tr.diff.schedule.network_timesteps(t)).float()
        top = logits.topk(min(5, logits.shape[1]), dim=-1).indices == y[:, None]
        loss = F.cross_entropy(logits, y, reduction="none")
        stats.append(torch.stack([loss, top[:, 0].float(), top.any(dim=-1).float()], 1))
    tr.model.train()
    means = dist.all_gather_cat(torch.cat(stats).double()).mean(dim=0).tolist()
    return dict(zip(["val_loss", "val_acc1", "val_acc5"], means, strict=True))


def ema_model(tr: Trainer) -> torch.nn.Module:
    """A copy of the model holding the first EMA rate's weights (the raw weights without EMA)."""
    if getattr(tr, "_ema_model", None) is None:
        tr._ema_model = copy.deepcopy(tr.model).eval()
    state = tr.ema.state_dict(tr.model, tr.ema.rates[0]) if tr.ema.rates else tr.model.state_dict()
    tr._ema_model.load_state_dict(state)
    return tr._ema_model


@torch.no_grad()
def sample_grid(tr: Trainer, path: Path) -> Tensor:
    """DDIM samples (`sample_steps`) of the EMA model from fixed noise, saved as a PNG grid.
    Class-conditional models cycle through the classes; upsamplers take the first images of
    the data set, area-downsampled, as low-resolution inputs."""
    cfg, net = tr.cfg, ema_model(tr)
    diff = Diffusion.from_config(
        dataclasses.replace(tr.preset.diffusion, timestep_respacing=cfg.sample_steps)
    )
    n, c, size = cfg.num_samples, tr.preset.network.in_channels, tr.preset.image_size
    gen = torch.Generator().manual_seed(dist.step_seed(cfg.seed, 0, 99))
    noise = torch.randn((n, c, size, size), generator=gen).to(tr.device)
    kwargs: dict[str, Tensor] = {}
    if tr.preset.network.num_classes is not None:
        kwargs["y"] = (torch.arange(n) % len(tr.setup.class_names)).to(tr.device)
    if tr.kind == "superres":
        dataset = datalib.TrainingImages(tr.setup.source, size, random_flip=False, channels=c)
        items = [dataset[(0, i % len(dataset))] for i in range(n)]
        x, _, _ = datalib.collate(items, skip_bad=True)
        kwargs["low_res"] = datalib.downsample_area(x, tr.preset.small_size).to(tr.device)

    def model_fn(x: Tensor, t: Tensor, **kw: Tensor) -> Tensor:
        with torch.autocast(tr.device.type, dtype=tr.amp, enabled=tr.amp is not None):
            return net(x, t, **kw).float()

    samples = ddim_sample(model_fn, diff, noise, model_kwargs=kwargs, clip_denoised=True)
    save_grid(samples, path)
    return samples
