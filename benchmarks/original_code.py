"""The paper's released code (openai/guided-diffusion) beside adm, for benchmarks comparing them.

The original is not vendored: it is imported from a path the user gives (`--original PATH` or
$ADM_ORIGINAL). Both networks are built from one configuration (an adm preset, i.e. the README's
flag line, translated to the original's constructor arguments and checked by translating back),
the weights are copied strictly, and the original's guided DDIM loop runs exactly as its
scripts/classifier_sample.py runs it. Only `unet.py`, `gaussian_diffusion.py` and `respace.py` are
imported (through `script_util`); `dist_util` (mpi4py) never is.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adm.diffusion.gaussian import DiffusionConfig
from adm.models import flags
from adm.nets.classifier import ClassifierConfig
from adm.nets.unet import UNetConfig

URL, COMMIT, ENV_VAR = "https://github.com/openai/guided-diffusion", "22e0df8", "ADM_ORIGINAL"
NetworkConfig = UNetConfig | ClassifierConfig


class OriginalMissing(Exception):
    """The original code is not where the user said; the message says where to get it."""


def find_original(path: str | None) -> Path:
    """The folder holding `guided_diffusion/unet.py`: `path`, else $ADM_ORIGINAL. Accepts the
    repository root or its `guided_diffusion` package folder."""
    given = path or os.environ.get(ENV_VAR)
    if not given:
        raise OriginalMissing(
            f"no original code given: clone {URL} (commit {COMMIT}) and pass --original PATH "
            f"or set {ENV_VAR}=PATH"
        )
    root = Path(given).expanduser()
    if root.name == "guided_diffusion":
        root = root.parent
    if not (root / "guided_diffusion" / "unet.py").is_file():
        raise OriginalMissing(
            f"the original code is not at {given} (no guided_diffusion/unet.py there): clone "
            f"{URL} (commit {COMMIT}) and pass its folder with --original PATH or {ENV_VAR}=PATH"
        )
    return root


def import_original(root: Path) -> ModuleType:
    """The original's `guided_diffusion.script_util` (it imports unet and the diffusion only)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module("guided_diffusion.script_util")
    if not str(Path(module.__file__ or "").resolve()).startswith(str(root.resolve())):
        raise OriginalMissing(
            f"another guided_diffusion is already imported ({module.__file__}), not the one at "
            f"{root}"
        )
    return module


def constructor_kwargs(config: NetworkConfig) -> tuple[str, dict]:
    """adm config -> (original class name, its constructor arguments); translating them back
    with `adm.models.flags.config_from_constructor` must give `config` again."""
    common = {
        "image_size": config.image_size,
        "in_channels": config.in_channels,
        "model_channels": config.model_channels,
        "out_channels": config.out_channels,
        "num_res_blocks": config.num_res_blocks,
        "attention_resolutions": tuple(config.attention_ds),
        "channel_mult": tuple(config.channel_mult),
        "num_head_channels": -1 if config.num_head_channels is None else config.num_head_channels,
        "use_scale_shift_norm": config.use_scale_shift_norm,
        "resblock_updown": config.resblock_updown,
        "use_fp16": False,  # fp32 on both sides; precision is a run-time choice in adm
    }
    for key in ("num_heads", "use_checkpoint", "use_new_attention_order", "conv_resample"):
        common[key] = getattr(config, key)
    if isinstance(config, ClassifierConfig):
        name, kwargs = "EncoderUNetModel", {**common, "pool": config.pool}
    else:
        upsample = config.num_heads_upsample
        name, kwargs = (
            "UNetModel",
            {
                **common,
                "dropout": config.dropout,
                "num_classes": config.num_classes,
                "num_heads_upsample": -1 if upsample is None else upsample,
            },
        )
    back = flags.config_from_constructor(name, kwargs)
    if back != config:
        raise ValueError(f"the original's {name} cannot express this config: {config}")
    return name, kwargs


def build_original(script_util: ModuleType, config: NetworkConfig) -> nn.Module:
    """The original network for an adm config, in eval mode, with zero-initialised layers given
    seeded random weights (outputs of zeros would make the agreement check empty)."""
    name, kwargs = constructor_kwargs(config)
    net = getattr(script_util, name)(**kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return net.eval()


def copy_weights(source: nn.Module, target: nn.Module) -> list[str]:
    """Load `source`'s state dict into `target` strictly; the key differences (empty when the
    keys match, in which case the copy was made)."""
    ours, theirs = set(target.state_dict()), set(source.state_dict())
    problems = [f"only in the original: {k}" for k in sorted(theirs - ours)]
    problems += [f"only in adm: {k}" for k in sorted(ours - theirs)]
    if not problems:
        target.load_state_dict(source.state_dict(), strict=True)
    return problems


def original_diffusion(script_util: ModuleType, config: DiffusionConfig, respacing: str):
    """The original's (respaced) `SpacedDiffusion` for an adm diffusion config."""
    return script_util.create_gaussian_diffusion(
        steps=config.steps,
        learn_sigma=config.learn_sigma,
        sigma_small=config.var_type == "fixed_small",
        noise_schedule=config.noise_schedule,
        use_kl=config.loss_type in ("kl", "rescaled_kl"),
        predict_xstart=config.mean_type == "x0",
        rescale_timesteps=config.rescale_timesteps,
        rescale_learned_sigmas=config.loss_type == "rescaled_mse",
        timestep_respacing=respacing,
    )


def original_guided_ddim(
    diffusion, model: nn.Module, classifier: nn.Module, scale: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """`run(noise, y) -> samples`: the original's `ddim_sample_loop` with `cond_fn` and
    `model_fn` written as in its scripts/classifier_sample.py (class-conditional model)."""

    def cond_fn(x, t, y=None):
        assert y is not None
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = classifier(x_in, t)
            log_probs = F.log_softmax(logits, dim=-1)
            selected = log_probs[range(len(logits)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale

    def model_fn(x, t, y=None):
        assert y is not None
        return model(x, t, y)

    def run(noise: Tensor, y: Tensor) -> Tensor:
        return diffusion.ddim_sample_loop(
            model_fn,
            tuple(noise.shape),
            noise=noise,
            clip_denoised=True,
            model_kwargs={"y": y},
            cond_fn=cond_fn,
            device=noise.device,
        )

    return run
