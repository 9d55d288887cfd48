"""Editing runs: `adm inpaint` (replacement / RePaint) and `adm edit` (SDEdit) over many images.

Around `adm.diffusion.inpaint` and `adm.diffusion.sdedit` this owns what `adm sample` owns around
the samplers: per-sample seeds (image i's start noise and step noise come from the generator of
(seed, i, stream 0), its known-region and jump noise from stream 2, so results do not depend on
the batch size), batches written atomically (`--resume` continues), and the outputs: `.npz`
(`arr_0` uint8 NHWC edits, `arr_1` the classes guided towards), a grid of input | mask | output and
settings.json. The known region is pasted in uint8 after quantisation, so it equals the input
exactly (the original's truncating quantiser alone would lower 63 of the 256 grey levels by one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from adm._util import signals
from adm._util.atomic import atomic_path
from adm.diffusion import guidance, inpaint, registry, sdedit
from adm.diffusion.gaussian import Diffusion, DiffusionConfig, draw_noise
from adm.generate.edit_io import edit_grid
from adm.generate.sample import diffusion_on_steps, prepare_output, sample_generator, to_uint8

EditMode = Literal["inpaint", "sdedit"]


@dataclass(frozen=True)
class EditJob:
    """What to do to every image. Inpainting: `steps` is a respacing string ("50", "ddim25"), or
    with `grid` a number of steps on that grid; `jump`/`resample` RePaint's j and r (r = 1:
    replacement, the only choice of the multistep solvers). SDEdit: `steps` is the number of
    steps of a whole-chain run, `strength` S, any sampler."""

    mode: EditMode = "inpaint"
    sampler: str = "ddpm"
    steps: str = "50"
    grid: str | None = None
    jump: int = 10
    resample: int = 1
    strength: float = 0.5
    batch_size: int = 16
    seed: int = 0
    classifier_scale: float = 0.0
    cfg_scale: float | None = None
    eta: float | None = None
    order: int | None = None
    churn: float | None = None
    s_noise: float | None = None
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        if self.mode == "inpaint":
            inpaint.check_sampler(self.sampler, self.resample)
        registry.check_options(self.sampler, **self.sampler_options)
        if self.batch_size < 1 or self.seed < 0:
            raise ValueError("--batch-size must be positive and --seed non-negative")
        if self.jump < 1 or self.resample < 1:
            raise ValueError(f"--jump and --resample must be at least 1, got {self.jump}, "
                             f"{self.resample}")  # fmt: skip
        if self.mode == "sdedit":
            sdedit.check_strength(self.strength)
            if not self.steps.isdigit() or int(self.steps) < 1:
                raise ValueError(f"--steps {self.steps!r}: adm edit takes a number of steps")
            if self.grid is not None:
                raise ValueError("--grid: adm edit spaces its steps evenly from t = S*T")

    @property
    def sampler_options(self) -> dict[str, float | int]:
        names = ("eta", "order", "churn", "s_noise")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def diffusion(self, config: DiffusionConfig) -> Diffusion:
        """Inpainting: the diffusion respaced to `steps`, with the jump length checked against
        it; SDEdit: the diffusion itself (the edit picks its own timesteps)."""
        if self.mode == "sdedit":
            return Diffusion.from_config(config)
        diff = diffusion_on_steps(config, self.steps, self.grid)
        inpaint.jump_schedule(diff.num_steps, self.jump, self.resample)  # jump < steps
        return diff

    def nfe(self, config: DiffusionConfig) -> int:
        """Network calls per image batch."""
        if self.mode == "inpaint":
            steps = self.diffusion(config).num_steps
            if self.sampler in inpaint.RESAMPLING_SAMPLERS:
                return inpaint.network_calls(steps, self.jump, self.resample)
            return registry.nfe(self.sampler, steps)
        ts = sdedit.edit_timesteps(self.sampler, config.steps, self.strength, int(self.steps))
        return registry.nfe(self.sampler, len(ts)) if ts else 0


@dataclass
class EditRun:
    """Everything fixed for one editing run. `images` uint8 [N, H, W, C]; `masks` bool [1 or N,
    H, W] (inpainting; True = keep); `labels` [N] the classes to guide towards (or None)."""

    model: nn.Module
    diffusion_config: DiffusionConfig
    job: EditJob
    out_dir: Path
    images: np.ndarray
    masks: np.ndarray | None = None
    labels: np.ndarray | None = None
    class_conditional: bool = False
    classifier: nn.Module | None = None
    null_label: int | None = None
    settings: dict = dataclasses.field(default_factory=dict)


def model_fn_of(run: EditRun, diff: Diffusion) -> Callable[..., Tensor]:
    """The network as `model_fn(x, t, y=...)`: labels only for class-conditional networks,
    classifier-free guidance around it when `cfg_scale` is set."""
    model, conditional = run.model, run.class_conditional

    def model_fn(x: Tensor, t: Tensor, y: Tensor | None = None, **kw: Tensor) -> Tensor:
        return model(x, t, **({"y": y} if conditional else {}), **kw)

    if run.job.cfg_scale is None:
        return model_fn
    if run.null_label is None:
        raise ValueError("classifier-free guidance needs the model's null label")
    return guidance.classifier_free_model_fn(model_fn, run.job.cfg_scale, null_label=run.null_label)


def edit_batch(
    run: EditRun, diff: Diffusion, indices: list[int], device: torch.device
) -> np.ndarray:
    """Edited images, uint8 [len(indices), H, W, C], known pixels equal to the input."""
    job = run.job
    x0_u8 = run.images[indices]
    # contiguous: a permuted (channels-last) x0 would make x_t channels-last through the
    # replacement, and the network's float32 kernels differ slightly between layouts
    x0 = torch.from_numpy(x0_u8).to(device).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1
    gens = [sample_generator(job.seed, i, 0, device) for i in indices]
    noise = draw_noise(x0, gens)
    kwargs = {}
    if run.labels is not None:
        kwargs["y"] = torch.as_tensor(run.labels[indices], device=device)
    cond_fn = None
    if run.classifier is not None and job.classifier_scale != 0:
        cond_fn = guidance.classifier_cond_fn(run.classifier, job.classifier_scale)
    common = dict(cond_fn=cond_fn, clip_denoised=job.clip_denoised, model_kwargs=kwargs,
                  generator=gens)  # fmt: skip
    model_fn = model_fn_of(run, diff)
    if job.mode == "sdedit":
        if job.strength == 0:  # the input itself (a float round trip would lose grey levels)
            return x0_u8.copy()
        out = sdedit.sdedit_sample(
            job.sampler, model_fn, diff, x0, noise, strength=job.strength,
            steps=int(job.steps), **common, **job.sampler_options,
        )  # fmt: skip
        return to_uint8(out)
    keep = _masks_of(run, indices)
    mask = torch.from_numpy(keep).to(device)[:, None].float()
    known = [sample_generator(job.seed, i, 2, device) for i in indices]
    out = inpaint.inpaint_sample(
        model_fn, diff, noise, x0, mask, sampler=job.sampler, jump=job.jump,
        resample=job.resample, known_generator=known, **common, **job.sampler_options,
    )  # fmt: skip
    return np.where(keep[..., None], x0_u8, to_uint8(out))


def _masks_of(run: EditRun, indices: list[int]) -> np.ndarray:
    masks = run.masks
    if masks is None:
        raise ValueError("inpainting needs masks")
    return masks[[0] * len(indices)] if len(masks) == 1 else masks[indices]


def _batch_path(out_dir: Path, k: int) -> Path:
    return out_dir / "batches" / f"batch_{k:06d}.npz"


def run_record(run: EditRun) -> dict:
    """The resolved settings (settings.json, and run.json which `--resume` compares)."""
    return {
        "job": dataclasses.asdict(run.job),
        "nfe": run.job.nfe(run.diffusion_config),
        "num_images": len(run.images),
        "diffusion": dataclasses.asdict(run.diffusion_config),
        **run.settings,
    }


def run_editing(run: EditRun, *, resume: bool = False, progress: bool = True) -> dict[str, Path]:
    """Edit every image of `run`, batch by batch; returns the written paths."""
    job, out_dir = run.job, run.out_dir
    device = _device_of(run.model)
    n = len(run.images)
    num_batches = math.ceil(n / job.batch_size)
    diff = job.diffusion(run.diffusion_config)
    done = set(prepare_output(out_dir, resume, num_batches, run_record(run)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=min(n, len(done) * job.batch_size), unit="img", desc=job.mode)
    start = time.perf_counter()
    for k in range(num_batches):
        if k in done:
            continue
        indices = list(range(k * job.batch_size, min((k + 1) * job.batch_size, n)))
        edited = edit_batch(run, diff, indices, device)
        with atomic_path(_batch_path(out_dir, k)) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=edited, indices=np.array(indices))
        if bar is not None:
            bar.update(len(indices))
        if signals.requested() and bar is not None:
            bar.close()
        signals.stop_if_requested(
            f"after batch {k + 1} of {num_batches} (finished batches are kept in "
            f"{out_dir / 'batches'}); rerun the same command with --resume to continue"
        )
    if bar is not None:
        bar.close()
    return write_outputs(run, num_batches, time.perf_counter() - start)


def write_outputs(run: EditRun, num_batches: int, seconds: float) -> dict[str, Path]:
    """The edits as .npz (arr_0, and arr_1 with the guided classes), grid.png, settings.json."""
    out_dir = run.out_dir
    images = np.concatenate(
        [np.load(_batch_path(out_dir, k))["images"] for k in range(num_batches)]
    )
    n, h, w, c = images.shape
    paths = {"npz": out_dir / f"edits_{n}x{h}x{w}x{c}.npz"}
    arrays = {"arr_0": images}
    if run.labels is not None:
        arrays["arr_1"] = run.labels.astype(np.int64)
    with atomic_path(paths["npz"]) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    paths["grid"] = out_dir / "grid.png"
    edit_grid(run.images, images, run.masks if run.job.mode == "inpaint" else None, paths["grid"])
    paths["settings"] = out_dir / "settings.json"
    record = {**run_record(run), "seconds_this_session": round(seconds, 1)}
    with atomic_path(paths["settings"]) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return paths


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
