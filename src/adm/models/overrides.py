"""Overrides of a preset without editing code: `--set section.field=value` and the original's flags.

`apply_overrides(preset, ["unet.dropout=0.0", "--num_channels 256 --attention_resolutions 32,16"])`
types each value by its dataclass field and gives pasted flag lines of openai/guided-diffusion the
meaning they have there, relative to the preset. All changes are validated together.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from adm.diffusion.gaussian import DiffusionConfig
from adm.models.flags import (
    CHANNEL_MULT_BY_SIZE,
    attention_ds,
    diffusion_from_flags,
    flag_pairs,
    parse_flag_line,
    parse_number,
)
from adm.models.presets import Preset

__all__ = ["apply_overrides"]

# ---- overrides: `--set section.field=value` and the original's flag lines ----------------------

_SECTIONS = {"network": "network", "unet": "network", "classifier": "network",
             "diffusion": "diffusion", "sampling": "sampling"}  # fmt: skip
_TOP_LEVEL = ("small_size", "paper_fid", "url", "description", "name")


def apply_overrides(preset: Preset, overrides: str | Sequence[str]) -> Preset:
    """A copy of `preset` with settings changed, for the CLI's `--set` and pasted flag lines.

    Items are `section.field=value` with section `unet` / `classifier` / `network`, `diffusion` or
    `sampling` (or a top-level field such as `small_size=64`), converted by the field's type:
    `unet.dropout=0.0`, `unet.attention_ds=4,8`, `unet.num_classes=none`, `sampling.steps=ddim25`.
    Items starting with `--` are the original's flags, applied first with the original's meaning
    (`--num_channels 256 --attention_resolutions 32,16,8`; flags the preset kind does not use are
    ignored, as the original's scripts ignore them). All changes are validated together.
    """
    items = [overrides] if isinstance(overrides, str) else list(overrides)
    flag_tokens, settings, pending = [], [], False
    for item in items:
        if not (pending or item.lstrip().startswith("--")):
            settings.append(item)
            continue
        for token in item.split():  # "--key value", "--key=value", or the value of a bare "--key"
            flag_tokens.append(token)
            pending = not pending and "=" not in token
    changes: dict[str, dict[str, Any]] = {"network": {}, "diffusion": {}, "sampling": {}, "": {}}
    if flag_tokens:
        for section, values in _flag_changes(preset, flag_tokens).items():
            changes[section].update(values)
    for item in settings:
        section, name, value = _parse_setting(preset, item)
        changes[section][name] = value
    try:
        return dataclasses.replace(
            preset,
            network=dataclasses.replace(preset.network, **changes["network"]),
            diffusion=dataclasses.replace(preset.diffusion, **changes["diffusion"]),
            sampling=dataclasses.replace(preset.sampling, **changes["sampling"]),
            **changes[""],
        )
    except (ValueError, TypeError) as err:
        raise ValueError(f"overrides of preset {preset.name!r}: {err}") from None


def _parse_setting(preset: Preset, item: str) -> tuple[str, str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
        raise ValueError(f"--set {item!r}: expected section.field=value, e.g. unet.dropout=0.0")
    prefix, dot, name = key.rpartition(".")
    if not dot:
        if key not in _TOP_LEVEL:
            raise ValueError(
                f"--set {item!r}: expected section.field=value with a section of "
                f"{', '.join(sorted(_SECTIONS))}, or one of {', '.join(_TOP_LEVEL)}"
            )
        return "", key, _convert(text.strip(), get_type_hints(type(preset))[key], item)
    if prefix not in _SECTIONS:
        close = difflib.get_close_matches(prefix, list(_SECTIONS), n=1)
        raise ValueError(
            f"--set {item!r}: unknown section {prefix!r}"
            + (f"; did you mean {close[0]!r}?" if close else "")
        )
    if prefix in ("unet", "classifier") and (prefix == "classifier") != (
        preset.kind == "classifier"
    ):
        right = "classifier" if preset.kind == "classifier" else "unet"
        raise ValueError(
            f"--set {item!r}: preset {preset.name!r} is a {preset.kind} model; "
            f"write {right}.{name}=..."
        )
    section = _SECTIONS[prefix]
    hints = get_type_hints(type(getattr(preset, section)))
    if name not in hints:
        close = difflib.get_close_matches(name, list(hints), n=3)
        raise ValueError(
            f"--set {item!r}: {prefix} has no field {name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + f" (fields: {', '.join(hints)})"
        )
    return section, name, _convert(text.strip(), hints[name], item)


_TRUE, _FALSE = ("true", "yes", "y", "t", "1"), ("false", "no", "n", "f", "0")


def _convert(text: str, annotation: Any, item: str) -> Any:
    """`text` as a value of type `annotation`: bool, int, float, str, Literal, tuple, X | None."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null", ""):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(text, arg, item)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if origin is Literal:
        if text in args:
            return text
        raise ValueError(f"--set {item!r}: expected one of {', '.join(map(str, args))}")
    if origin is tuple:
        parts = [p.strip() for p in text.strip("()[] ").split(",") if p.strip()]
        values = tuple(_convert(p, args[0], item) for p in parts)
        # channel_mult (1, 2, 3.5): whole numbers stay ints, as the flag translation writes them
        return tuple(int(v) if isinstance(v, float) and v.is_integer() else v for v in values)
    if annotation is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"--set {item!r}: expected a boolean (true/false)")
    if annotation in (int, float, str):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(f"--set {item!r}: expected {annotation.__name__}") from None
    raise ValueError(f"--set {item!r}: cannot parse a value of type {annotation}")


# The original's flags -> fields. Model flags of the diffusion/super-res scripts and classifier
# flags; flags of the other kind are ignored (the original's sample scripts take both at once).
_UNET_FLAGS = {
    "num_channels": "model_channels", "num_res_blocks": "num_res_blocks", "dropout": "dropout",
    "num_heads": "num_heads", "num_head_channels": "num_head_channels",
    "num_heads_upsample": "num_heads_upsample", "use_scale_shift_norm": "use_scale_shift_norm",
    "resblock_updown": "resblock_updown", "use_new_attention_order": "use_new_attention_order",
    "use_checkpoint": "use_checkpoint",
}  # fmt: skip
_CLASSIFIER_FLAGS = {
    "classifier_width": "model_channels", "classifier_depth": "num_res_blocks",
    "classifier_use_scale_shift_norm": "use_scale_shift_norm",
    "classifier_resblock_updown": "resblock_updown", "classifier_pool": "pool",
}  # fmt: skip
# Flags of the original's sample scripts -> SamplingSettings fields.
_SAMPLE_FLAGS = {"timestep_respacing": "steps", "use_ddim": "sampler", "batch_size": "batch_size",
                 "num_samples": "num_samples", "classifier_scale": "classifier_scale",
                 "clip_denoised": "clip_denoised"}  # fmt: skip
_FILE_FLAGS = ("model_path", "classifier_path", "base_samples", "data_dir", "resume_checkpoint")


def _flag_changes(preset: Preset, tokens: list[str]) -> dict[str, dict[str, Any]]:
    """Field changes meaning what the original's flags mean, relative to `preset`."""
    pairs = flag_pairs(tokens)
    for key, _ in pairs:
        if key in _FILE_FLAGS:
            raise ValueError(f"--{key} names a file, not a setting: pass the file on its own")
    hints = get_type_hints(type(preset.sampling))
    sampling: dict[str, Any] = {}
    for key, text in pairs:
        if key == "use_ddim":
            sampling["sampler"] = "ddim" if _convert(text, bool, f"--{key}") else "ddpm"
        elif key in _SAMPLE_FLAGS:
            name = _SAMPLE_FLAGS[key]
            sampling[name] = _convert(text, hints[name], f"--{key}")
    flags = parse_flag_line([f"--{k}={v}" for k, v in pairs if k not in _SAMPLE_FLAGS])
    fp16_flag = "classifier_use_fp16" if preset.kind == "classifier" else "use_fp16"
    if fp16_flag in flags:
        sampling["precision"] = "fp16" if flags[fp16_flag] else "fp32"
    diffusion = diffusion_from_flags({**_diffusion_flags(preset.diffusion), **flags})
    # Read-outs the flags do not reach (PREVIOUS_X, LEARNED, plain KL) stay as they were.
    keep = {"mean_type": ("predict_xstart",), "var_type": ("learn_sigma", "sigma_small"),
            "loss_type": ("use_kl", "rescale_learned_sigmas")}  # fmt: skip
    diffusion_changes = {
        f.name: getattr(diffusion, f.name)
        for f in dataclasses.fields(diffusion)
        if f.name not in keep or any(k in flags for k in keep[f.name])
    }
    diffusion_changes.pop("timestep_respacing")  # a sampling choice here: sampling.steps
    out = {"network": _network_changes(preset, flags), "diffusion": diffusion_changes}
    out["sampling"], out[""] = sampling, {}
    if preset.kind == "superres" and "small_size" in flags:
        out[""]["small_size"] = flags["small_size"]
    return out


def _network_changes(preset: Preset, flags: dict[str, Any]) -> dict[str, Any]:
    net, classifier = preset.network, preset.kind == "classifier"
    size_flag = "large_size" if preset.kind == "superres" else "image_size"
    table = _CLASSIFIER_FLAGS if classifier else _UNET_FLAGS
    out: dict[str, Any] = {table[k]: v for k, v in flags.items() if k in table}
    for name in ("num_head_channels", "num_heads_upsample"):
        if name in out:
            out[name] = None if out[name] == -1 else out[name]
    if not classifier:
        if "class_cond" in flags:
            out["num_classes"] = 1000 if flags["class_cond"] else None
        if "learn_sigma" in flags:
            out["out_channels"] = net.in_channels * (2 if flags["learn_sigma"] else 1)
    size = int(flags.get(size_flag, net.image_size))
    if size != net.image_size:
        out["image_size"] = size
    attention = "classifier_attention_resolutions" if classifier else "attention_resolutions"
    pixels = flags.get(attention, ",".join(str(net.image_size // ds) for ds in net.attention_ds))
    if attention in flags or size != net.image_size:
        out["attention_ds"] = attention_ds(pixels, size)
    if "channel_mult" in flags and flags["channel_mult"] and not classifier:
        out["channel_mult"] = tuple(parse_number(m) for m in flags["channel_mult"].split(","))
    elif size != net.image_size or flags.get("channel_mult") == "":
        # The original picks the multipliers by image size (super-res: by its large size).
        lookup = 256 if preset.kind == "superres" and size == 512 else size
        if lookup not in CHANNEL_MULT_BY_SIZE:
            raise ValueError(f"no default channel_mult for image size {size}; set channel_mult")
        out["channel_mult"] = CHANNEL_MULT_BY_SIZE[lookup]
    return out


def _diffusion_flags(config: DiffusionConfig) -> dict[str, Any]:
    """The original's diffusion flags for a config (exact unless it uses a read-out the flags
    cannot reach: PREVIOUS_X mean, LEARNED variance, plain KL loss)."""
    return {
        "diffusion_steps": config.steps,
        "noise_schedule": config.noise_schedule,
        "timestep_respacing": config.timestep_respacing,
        "learn_sigma": config.learn_sigma,
        "sigma_small": config.var_type == "fixed_small",
        "predict_xstart": config.mean_type == "x0",
        "use_kl": config.loss_type in ("kl", "rescaled_kl"),
        "rescale_learned_sigmas": config.loss_type == "rescaled_mse",
        "rescale_timesteps": config.rescale_timesteps,
    }
