"""One optimisation step of the paper's training recipe, and the run state around it.

`Trainer` holds the model (DDP-wrapped under torchrun), AdamW, the EMAs, the torch.amp grad
scaler and the timestep sampler; it restores them from a run folder and saves them (see
`adm.training.state`). A step (the original `TrainLoop.run_step` / `classifier_train.py`): draw the
step's randomness for the GLOBAL batch from generators seeded by (seed, step) and slice this
rank's share, so results do not depend on the number of processes and a resumed run continues
exactly (bitwise on CPU); micro-batches (DDP `no_sync` but the last), gradients averaged; the
hybrid diffusion loss or the noisy-classifier cross-entropy; non-finite losses skipped.
"""

from __future__ import annotations

import contextlib
import errno
import json
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from adm._util import dist
from adm._util.errors import os_error_text
from adm._util.runtime import compile_model
from adm.data import datasets as datalib
from adm.diffusion.gaussian import Diffusion, q_sample, training_losses
from adm.diffusion.resample import create_sampler
from adm.models import checkpoint
from adm.models.presets import build_model, preset_to_dict
from adm.nets.unet import set_attention_checkpointing
from adm.training import state as ts
from adm.training.log import MetricMeter
from adm.training.lr import LRSchedule, ScheduleConflict, resume_note
from adm.training.setup import RunSetup, identity_differences

__all__ = ["Trainer", "TrainingError", "amp_dtype"]

_DIFFUSION_COLUMNS = ["loss", "mse", "vb"]
_CLASSIFIER_COLUMNS = ["loss", "acc1", "acc5"]


class TrainingError(RuntimeError):
    """Training cannot go on (repeated non-finite losses, an incompatible run folder)."""


class _Damaged(Exception):
    """A checkpoint file of the run cannot be read (truncated, corrupted, missing)."""


def _read(path: Path, load: Callable[[], Any]) -> Any:
    """`load()`, a failure to read `path` turned into `_Damaged` naming the file."""
    try:
        return load()
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise _Damaged(f"{path.name} cannot be read ({reason})") from None


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name; "auto" is bf16 (fp16 without bf16 support) on
    CUDA and fp32 (None: no autocast) elsewhere."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class Trainer:
    """One run's model, optimizer, EMA, sampler and files (a class: the state is the point)."""

    def __init__(self, setup: RunSetup, info: dist.DistInfo):
        self.setup, self.info, self.cfg = setup, info, setup.config
        self.preset, self.kind, self.device = setup.preset, setup.preset.kind, info.device
        self.run_dir = Path(setup.run_dir)
        self.amp = amp_dtype(self.cfg.precision, self.device)
        self.diff = Diffusion.from_config(self.preset.diffusion)
        self.sampler = create_sampler(self.cfg.timestep_sampler, self.diff.num_steps)
        self.notes: list[str] = []
        resume, previous = self._prepare_run_dir()
        dist.seed_everything(self.cfg.seed)
        self.model = build_model(self.preset).to(self.device).train()
        if setup.init_from and resume is None:
            sd = checkpoint.load_state_dict(checkpoint.resolve_checkpoint(setup.init_from))
            if diffs := checkpoint.fit_differences(sd, self.preset):
                raise TrainingError(
                    f"--init-from {setup.init_from}: its weights do not fit {self.preset.name} "
                    f"({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''}): start from a "
                    f"checkpoint of the same architecture, or pick its preset with --preset"
                )
            self.model.load_state_dict(sd, strict=True)
        rates = self.cfg.ema_rates
        self.ema = ts.EMA(self.model, rates)
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        fp16 = self.amp == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.step, self.skipped, self.nonfinite_run = 0, 0, 0
        self.bad_images: set[str] = set()
        self.schedule = LRSchedule(self.cfg.lr, self.cfg.steps, self.cfg.anneal_lr)
        # Every change of the LR schedule on resume, kept across restarts in config.json.
        self.lr_changes: list[dict[str, Any]] = list((previous or {}).get("lr_changes", []))
        if resume is not None:
            self._restore_newest_intact(resume, previous)
        if info.is_main:
            self._write_run_files()
        self.net = self.model
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.cfg.checkpoint_attention:
            set_attention_checkpointing(self.model)
        if self.cfg.compile:
            self.net = compile_model(self.net, label=f"rank {info.rank} network")
        self.plan = datalib.BatchPlan(
            len(setup.source), self.cfg.batch_size, rank=info.rank,
            world_size=info.world_size, seed=self.cfg.seed,
        )  # fmt: skip
        self.meter = MetricMeter()
        self.columns = _CLASSIFIER_COLUMNS if self.kind == "classifier" else _DIFFUSION_COLUMNS

    # ---- run folder, resume, checkpoints ----------------------------------------------------

    def _prepare_run_dir(self) -> tuple[int | None, dict[str, Any] | None]:
        """Create the run folder, check that an existing run there is this run; return the step
        of its latest complete checkpoint (None for a fresh run) and its `config.json` (the
        previous invocation's). `config.json` and `classes.json` are (re)written once the run
        is resumed, so a refused resume leaves them as they were."""
        resume, problem, previous = None, None, None
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resume = ts.latest_step(self.run_dir)
            config_file = self.run_dir / "config.json"
            mine = json.loads(json.dumps(preset_to_dict(self.preset)))
            if resume is not None and config_file.is_file():
                config = json.loads(config_file.read_text())
                theirs, previous = config["preset"], config
                if {k: theirs.get(k) for k in ("kind", "network", "diffusion")} != {
                    k: mine[k] for k in ("kind", "network", "diffusion")
                }:
                    problem = (
                        f"{self.run_dir} holds a run of a different model; resume it with its "
                        "own settings or choose a new --out folder"
                    )
                elif changes := identity_differences(config, self.setup.describe()):
                    if self.setup.force_resume:
                        self.notes.append(f"--force: continuing with {'; '.join(changes)}")
                    else:
                        problem = (
                            f"{self.run_dir} holds a run with other settings ("
                            f"{'; '.join(changes)}); rerun with the run's own settings, pass "
                            "--force to continue it with these, or choose a new --out folder"
                        )
        resume, problem, previous = dist.broadcast_object((resume, problem, previous))
        if problem:
            raise TrainingError(problem)
        return resume, previous

    def _write_run_files(self) -> None:
        """`config.json` (the resolved run, with the LR schedule in effect and the notes of this
        start) and `classes.json`."""
        describe = self.setup.describe()
        describe.update(notes=[*describe["notes"], *self.notes])
        describe.update(lr_schedule=self.schedule.to_dict(), lr_changes=self.lr_changes)
        ts.write_json(self.run_dir / "config.json", describe)
        ts.write_json(self.run_dir / "classes.json", self.setup.class_map())

    def _restore_newest_intact(self, newest: int, previous: dict[str, Any] | None) -> None:
        """Resume from the newest checkpoint whose files all read; a damaged newer one (e.g. a
        truncated state file) is skipped, and the notes and the console say so."""
        damaged: list[str] = []
        for step in sorted((s for s in ts.checkpoint_steps(self.run_dir) if s <= newest),
                           reverse=True):  # fmt: skip
            try:
                self._restore(step, previous)
            except _Damaged as err:
                damaged.append(f"step {step}: {err}")
                continue
            if damaged:
                note = (f"resumed from step {step}, the newest intact checkpoint; skipped the "
                        f"damaged {'; '.join(damaged)}")  # fmt: skip
                self.notes.append(note)
                if self.info.is_main:
                    tqdm.write(f"adm: {note}", file=sys.stderr)
            return
        raise TrainingError(
            f"{self.run_dir}: no checkpoint can be read ({'; '.join(damaged)}); move the run "
            "folder away to start afresh"
        )

    def _restore(self, step: int, previous: dict[str, Any] | None) -> None:
        run_dir = self.run_dir
        state = _read(ts.state_path(run_dir, step), lambda: ts.load_state(run_dir, step))
        self.step = state["step"]
        # The LR schedule first: a refused resume costs no weight loading.
        if "lr_schedule" in state:
            saved = LRSchedule.from_dict(state["lr_schedule"])
        elif previous is not None and "train" in previous:  # state from before lr_schedule
            train = previous["train"]
            saved = LRSchedule(train["lr"], train["steps"], train["anneal_lr"])
        else:
            saved = self.schedule
        try:
            note = resume_note(saved, self.schedule, self.step)
        except ScheduleConflict as err:
            raise TrainingError(f"{run_dir}: {err}") from None
        path = ts.model_path(run_dir, step)
        self.model.load_state_dict(_read(path, lambda: checkpoint.load_state_dict(path)))
        for rate in self.ema.rates:
            path = ts.ema_path(run_dir, rate, step)
            if not path.is_file():
                raise TrainingError(f"{path} is missing: resume with the run's own --ema-rate")
            self.ema.load(rate, _read(path, lambda path=path: checkpoint.load_state_dict(path)))
        self.opt.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        if len(state["rng"]) == self.info.world_size:
            dist.set_rng_state(state["rng"][self.info.rank])
        self.skipped, self.bad_images = state["skipped_steps"], set(state["bad_images"])
        if note:
            self.notes.append(f"resumed {note}")
            self.lr_changes.append({"step": self.step, "note": note})
        if self.info.is_main:
            tqdm.write(f"resuming {run_dir} {note or f'from step {step}'}")

    def save(self) -> None:
        """Write the checkpoint of the current step (all ranks must call it)."""
        rngs = dist.all_gather_objects(dist.rng_state())
        if self.info.is_main:
            try:
                self._write_checkpoint(rngs)
            except OSError as err:  # e.g. disk full: one line, and what is still safe
                last = ts.latest_step(self.run_dir)
                kept = "no earlier checkpoint" if last is None else (
                    f"the previous checkpoint (step {last}) is intact")  # fmt: skip
                what = "no space left on device" if err.errno == errno.ENOSPC else (
                    os_error_text(err))  # fmt: skip
                raise TrainingError(
                    f"{what} while writing the checkpoint of step {self.step} in "
                    f"{self.run_dir}; {kept}"
                ) from None
        dist.barrier()

    def _write_checkpoint(self, rngs: list[Any]) -> None:
        """The model, EMA and state files of this step (the state file last: it marks the
        checkpoint complete), then the pruning of old ones."""
        checkpoint.save_model(self.model, self.preset, ts.model_path(self.run_dir, self.step))
        for rate in self.ema.rates:
            checkpoint.write_state_dict(
                self.ema.state_dict(self.model, rate), self.preset,
                ts.ema_path(self.run_dir, rate, self.step),
            )  # fmt: skip
        state = {
            "kind": self.kind,
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "sampler": self.sampler.state_dict(),
            "rng": rngs,
            "world_size": self.info.world_size,
            "data": {
                "global_batch": self.cfg.batch_size,
                "seed": self.cfg.seed,
                "items": len(self.setup.source),
                "next_step": self.step,
            },
            "ema_rates": list(self.ema.rates),
            "lr_schedule": self.schedule.to_dict(),
            "skipped_steps": self.skipped,
            "bad_images": sorted(self.bad_images),
            "class_map": json.dumps(self.setup.class_map()),
        }
        ts.save_state(self.run_dir, self.step, state)
        ts.prune(self.run_dir, self.cfg.keep)

    # ---- one optimisation step --------------------------------------------------------------

    def _forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.net(*args, **kwargs)
        return out.float()

    def _step_randomness(self, shape: tuple[int, ...]) -> dict[str, Tensor]:
        """Timesteps, weights, noise and label-dropout draws of this rank's share of the global
        batch of the current step (drawn for the whole global batch, then sliced)."""
        cfg, b = self.cfg, self.plan.local_batch
        lo = self.info.rank * b
        gen = torch.Generator().manual_seed(dist.step_seed(cfg.seed, self.step, 0))
        dev_gen = gen
        if self.device.type != "cpu":
            dev_gen = torch.Generator(self.device)
            dev_gen.manual_seed(dist.step_seed(cfg.seed, self.step, 1))
        t, w = self.sampler.sample(cfg.batch_size, gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout
        noise = torch.randn((cfg.batch_size, *shape), generator=dev_gen, device=dev_gen.device)
        out = {"t": t, "w": w, "drop": drop}
        out = {k: v[lo : lo + b].to(self.device) for k, v in out.items()}
        out["noise"] = noise[lo : lo + b].to(self.device)
        return out

    def _micro_losses(self, x: Tensor, y: Tensor, r: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(per-example objective [n], statistics [n, 2 + 3]: t, weight and the logged columns)."""
        if self.kind == "classifier":
            t = r["t"] if self.cfg.noised else torch.zeros_like(r["t"])
            x_t = q_sample(self.diff, x, t, r["noise"]) if self.cfg.noised else x
            logits = self._forward(x_t, self.diff.schedule.network_timesteps(t))
            loss = F.cross_entropy(logits, y, reduction="none")
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=-1).indices == y[:, None]
            cols = [loss, top[:, 0].float(), top.any(dim=-1).float()]
            return loss, torch.stack([t.float(), torch.ones_like(loss), *cols], 1).detach()
        kwargs: dict[str, Tensor] = {}
        if self.preset.network.num_classes is not None:
            kwargs["y"] = y if self.setup.null_label is None else y.masked_fill(
                r["drop"], self.setup.null_label
            )  # fmt: skip
        if self.kind == "superres":
            kwargs["low_res"] = datalib.downsample_area(x, self.preset.small_size)
        terms = training_losses(
            self.diff, self._forward, x, r["t"], noise=r["noise"], model_kwargs=kwargs
        )
        vb = terms.get("vb", torch.zeros_like(terms["loss"]))
        cols = [terms["loss"], terms["mse"], vb]
        stats = torch.stack([r["t"].float(), r["w"], *cols], 1).detach()
        return terms["loss"] * r["w"], stats

    def train_step(self, x: Tensor, y: Tensor) -> None:
        cfg, b = self.cfg, self.plan.local_batch
        r = self._step_randomness(tuple(x.shape[1:]))
        torch.manual_seed(dist.step_seed(cfg.seed, self.step, 2 + self.info.rank))  # dropout
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        lr = self.schedule.at(self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        mb = cfg.microbatch or b
        stats = []
        for i in range(0, b, mb):
            last = i + mb >= b
            sync = contextlib.nullcontext()
            if self.net is not self.model and not last:
                sync = self.net.no_sync()
            with sync:
                part = {k: v[i : i + mb] for k, v in r.items()}
                objective, st = self._micro_losses(x[i : i + mb], y[i : i + mb], part)
                # Average over the local batch (the original sums per-micro-batch means).
                self.scaler.scale(objective.sum() / b).backward()
            stats.append(st)
        stats = dist.all_gather_cat(torch.cat(stats).double())  # [global batch, 5]
        self._optimise(stats, lr)

    def _optimise(self, stats: Tensor, lr: float) -> None:
        cfg = self.cfg
        fp16 = self.scaler.is_enabled()
        if fp16:
            self.scaler.unscale_(self.opt)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
        finite_loss = bool(torch.isfinite(stats[:, 2]).all())
        if not finite_loss or (not fp16 and not torch.isfinite(torch.tensor(norm))):
            self._skip("loss" if not finite_loss else "gradient norm")
        else:
            self.nonfinite_run = 0
            if fp16:
                scale = self.scaler.get_scale()
                self.scaler.step(self.opt)
                self.scaler.update()
                took = self.scaler.get_scale() >= scale
            else:
                self.opt.step()
                took = True
            self._check_weights()
            self.sampler.update(stats[:, 0].long(), stats[:, 2])
            if took:
                self.ema.update(self.model.parameters())
            self._record(stats, norm, lr)
        self.step += 1

    def _check_weights(self) -> None:
        """Stop before a non-finite weight reaches the EMA or a checkpoint. The largest |w| of each
        tensor (no overflow, unlike a 2-norm) is NaN or inf only if a weight is: one fused pass
        and one sync a step, beside the loss check's."""
        params = list(self.model.parameters())
        worst = torch._foreach_norm(params, float("inf"))
        if bool(torch.isfinite(torch.stack(worst)).all()):
            return
        name = next(n for (n, _), w in zip(self.model.named_parameters(), worst, strict=True)
                    if not bool(torch.isfinite(w)))  # fmt: skip
        last = ts.latest_step(self.run_dir)
        raise TrainingError(
            f"step {self.step}: the optimizer step made weight {name} non-finite (NaN or inf) "
            "with a finite loss and gradient; stopped before it reached the EMA or a checkpoint. "
            f"Latest checkpoint: {'none' if last is None else f'step {last}'}. Try a lower --lr "
            "or --weight-decay, or --grad-clip"
        )

    def _skip(self, what: str) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        self.skipped += 1
        self.nonfinite_run += 1
        if self.info.is_main:
            tqdm.write(
                f"step {self.step}: non-finite {what}; step skipped "
                f"({self.nonfinite_run}/{self.cfg.max_nonfinite} in a row)"
            )
        if self.nonfinite_run >= self.cfg.max_nonfinite:
            last = ts.latest_step(self.run_dir)
            raise TrainingError(
                f"non-finite {what} at {self.nonfinite_run} consecutive steps (last: step "
                f"{self.step}); stopped. Latest checkpoint: "
                f"{'none' if last is None else f'step {last}'}. Try a lower --lr, --grad-clip or "
                "--precision fp32"
            )

    def _record(self, stats: Tensor, norm: float, lr: float) -> None:
        t, w = stats[:, 0].long(), stats[:, 1]
        for j, name in enumerate(self.columns):
            values = stats[:, 2 + j] * (w if self.kind != "classifier" else 1)
            self.meter.add_by_quartile(name, values, t, self.diff.num_steps)
        self.meter.add("grad_norm", norm)
        self.meter.set("lr", lr)
        if self.scaler.is_enabled():
            self.meter.set("loss_scale", self.scaler.get_scale())

    def to_summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "step": self.step,
            "skipped_steps": self.skipped,
            "bad_images": len(self.bad_images),
            "checkpoint": str(ts.model_path(self.run_dir, self.step)),
            "ema": [str(ts.ema_path(self.run_dir, r, self.step)) for r in self.ema.rates],
        }
