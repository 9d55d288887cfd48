"""The original's flags at the edge: openai/guided-diffusion flag dicts -> adm's typed configs.

Users paste the flag lines they already have (`--num_channels 256 --attention_resolutions 32,16,8
...`); the original's constructor kwargs (`UNetModel(...)`, `EncoderUNetModel(...)`) and the
settings it cannot reach from flags (PREVIOUS_X mean, LEARNED variance, plain KL) translate here
too. This is the only module that knows those names; library code takes typed configs.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from adm.diffusion.gaussian import DiffusionConfig
from adm.nets.classifier import ClassifierConfig, NoisyClassifier
from adm.nets.unet import SuperResUNet, UNet, UNetConfig

# `model_and_diffusion_defaults()` + `classifier_defaults()` + super-res sizes of the original CLI.
DIFFUSION_DEFAULTS: dict[str, Any] = {
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": False,
    "rescale_learned_sigmas": False,
    "sigma_small": False,  # not a CLI flag of the original; accepted here
}
MODEL_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
}
SUPERRES_DEFAULTS: dict[str, Any] = {"large_size": 256, "small_size": 64}
CLASSIFIER_DEFAULTS: dict[str, Any] = {
    "classifier_use_fp16": False,
    "classifier_width": 128,
    "classifier_depth": 2,
    "classifier_attention_resolutions": "32,16,8",
    "classifier_use_scale_shift_norm": True,
    "classifier_resblock_updown": True,
    "classifier_pool": "attention",
}
ALL_DEFAULTS = {**DIFFUSION_DEFAULTS, **MODEL_DEFAULTS, **SUPERRES_DEFAULTS, **CLASSIFIER_DEFAULTS}

# One place for the image size -> channel_mult table of the original.
CHANNEL_MULT_BY_SIZE: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

_MEAN_TYPES = {"EPSILON": "eps", "START_X": "x0", "PREVIOUS_X": "prev_x"}
_VAR_TYPES = {
    "FIXED_SMALL": "fixed_small",
    "FIXED_LARGE": "fixed_large",
    "LEARNED": "learned",
    "LEARNED_RANGE": "learned_range",
}
_LOSS_TYPES = {
    "MSE": "mse",
    "RESCALED_MSE": "rescaled_mse",
    "KL": "kl",
    "RESCALED_KL": "rescaled_kl",
}


def flag_pairs(tokens: str | Sequence[str]) -> list[tuple[str, str]]:
    """`--key value` / `--key=value` tokens -> [(key, value text), ...], in order, untyped."""
    if isinstance(tokens, str):
        tokens = tokens.split()
    tokens = list(tokens)
    pairs, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ValueError(f"expected a flag such as --num_channels, got {token!r}")
        key, sep, value = token[2:].partition("=")
        if not sep:
            if i + 1 >= len(tokens):
                raise ValueError(f"flag --{key} has no value")
            i, value = i + 1, tokens[i + 1]
        pairs.append((key, value))
        i += 1
    return pairs


def parse_flag_line(tokens: str | Sequence[str]) -> dict[str, Any]:
    """`--key value` pairs of the original's scripts -> a dict typed by the original's defaults.

    Booleans accept yes/true/t/y/1 and no/false/f/n/0. Unknown flags raise `ValueError` with the
    closest known names.
    """
    out: dict[str, Any] = {}
    for key, value in flag_pairs(tokens):
        if key not in ALL_DEFAULTS:
            close = difflib.get_close_matches(key, list(ALL_DEFAULTS), n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise ValueError(f"unknown flag --{key}{hint}")
        out[key] = _typed(key, value, ALL_DEFAULTS[key])
    return out


def _typed(key: str, value: str, default: Any) -> Any:
    if isinstance(default, bool):
        v = value.lower()
        if v in ("yes", "true", "t", "y", "1"):
            return True
        if v in ("no", "false", "f", "n", "0"):
            return False
        raise ValueError(f"flag --{key} expects a boolean (True/False), got {value!r}")
    try:
        return type(default)(value)
    except ValueError:
        raise ValueError(f"flag --{key} expects {type(default).__name__}, got {value!r}") from None


def _check_known(flags: Mapping[str, Any], known: Mapping[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(flags) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} flag(s): {', '.join(unknown)}")
    return {**known, **flags}


def attention_ds(resolutions: str, image_size: int) -> tuple[int, ...]:
    """The flags give attention resolutions in pixels; the networks take downsample factors."""
    out = []
    for r in str(resolutions).split(","):
        if not r.strip():
            continue
        res = int(r)
        if res <= 0 or image_size % res:
            raise ValueError(f"attention resolution {res} does not divide image size {image_size}")
        out.append(image_size // res)
    return tuple(out)


def _channel_mult(channel_mult: str, image_size: int) -> tuple[float, ...]:
    if channel_mult:
        # The original int-parses each entry; fractions are accepted here (e.g. "0.5,1,1,2").
        return tuple(parse_number(m) for m in str(channel_mult).split(","))
    if image_size not in CHANNEL_MULT_BY_SIZE:
        raise ValueError(
            f"no default channel_mult for image size {image_size} "
            f"(known: {sorted(CHANNEL_MULT_BY_SIZE)}); pass --channel_mult"
        )
    return CHANNEL_MULT_BY_SIZE[image_size]


def parse_number(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() else value


def _none_if_negative(value: int) -> int | None:
    return None if value == -1 else int(value)


def diffusion_from_flags(flags: Mapping[str, Any]) -> DiffusionConfig:
    """`create_gaussian_diffusion` flags (+ `diffusion_steps`/`steps`) -> DiffusionConfig."""
    flags = dict(flags)
    if "steps" in flags:
        flags["diffusion_steps"] = flags.pop("steps")
    f = {**DIFFUSION_DEFAULTS, **{k: v for k, v in flags.items() if k in DIFFUSION_DEFAULTS}}
    if f["use_kl"]:
        loss = "rescaled_kl"
    elif f["rescale_learned_sigmas"]:
        loss = "rescaled_mse"
    else:
        loss = "mse"
    if f["learn_sigma"]:
        var = "learned_range"
    else:
        var = "fixed_small" if f["sigma_small"] else "fixed_large"
    return DiffusionConfig(
        steps=int(f["diffusion_steps"]),
        noise_schedule=f["noise_schedule"],
        mean_type="x0" if f["predict_xstart"] else "eps",
        var_type=var,
        loss_type=loss,
        rescale_timesteps=bool(f["rescale_timesteps"]),
        timestep_respacing=str(f["timestep_respacing"] or ""),
    )


def apply_overrides(config: DiffusionConfig, overrides: Mapping[str, str]) -> DiffusionConfig:
    """Settings the original reaches only by editing code: `model_mean_type`, `model_var_type`,
    `loss_type` given by the original's enum names (e.g. {"model_mean_type": "PREVIOUS_X"})."""
    import dataclasses

    tables = {
        "model_mean_type": ("mean_type", _MEAN_TYPES),
        "model_var_type": ("var_type", _VAR_TYPES),
        "loss_type": ("loss_type", _LOSS_TYPES),
    }
    changes = {}
    for key, value in overrides.items():
        if key not in tables:
            raise ValueError(f"unknown override {key!r}: expected one of {sorted(tables)}")
        field, names = tables[key]
        if value not in names:
            raise ValueError(f"unknown {key} {value!r}: expected one of {sorted(names)}")
        changes[field] = names[value]
    return dataclasses.replace(config, **changes)


def unet_from_flags(flags: Mapping[str, Any]) -> UNetConfig:
    """`create_model` flags (as on the command line) -> UNetConfig."""
    f = {**MODEL_DEFAULTS, **{k: v for k, v in flags.items() if k in MODEL_DEFAULTS}}
    f["learn_sigma"] = flags.get("learn_sigma", False)
    size = int(f["image_size"])
    return UNetConfig(
        image_size=size,
        in_channels=3,
        model_channels=int(f["num_channels"]),
        out_channels=6 if f["learn_sigma"] else 3,
        num_res_blocks=int(f["num_res_blocks"]),
        attention_ds=attention_ds(f["attention_resolutions"], size),
        dropout=float(f["dropout"]),
        channel_mult=_channel_mult(f["channel_mult"], size),
        num_classes=1000 if f["class_cond"] else None,
        num_heads=int(f["num_heads"]),
        num_head_channels=_none_if_negative(f["num_head_channels"]),
        num_heads_upsample=_none_if_negative(f["num_heads_upsample"]),
        use_scale_shift_norm=bool(f["use_scale_shift_norm"]),
        resblock_updown=bool(f["resblock_updown"]),
        use_new_attention_order=bool(f["use_new_attention_order"]),
        use_checkpoint=bool(f["use_checkpoint"]),
    )


def superres_from_flags(flags: Mapping[str, Any]) -> tuple[UNetConfig, int]:
    """`sr_create_model` flags -> (UNetConfig at the large size, small size). The config's
    in_channels counts image channels; `SuperResUNet` doubles them for the low-res input."""
    large = int(flags.get("large_size", SUPERRES_DEFAULTS["large_size"]))
    small = int(flags.get("small_size", SUPERRES_DEFAULTS["small_size"]))
    # The original picks channel_mult by large size only and cannot parse one from flags.
    mult = {512: CHANNEL_MULT_BY_SIZE[256], 256: CHANNEL_MULT_BY_SIZE[256]}.get(large)
    if mult is None:
        mult = _channel_mult("", large)
    model_flags = {k: v for k, v in flags.items() if k not in ("large_size", "small_size")}
    model_flags.update(image_size=large, channel_mult=",".join(str(m) for m in mult))
    return unet_from_flags(model_flags), small


def classifier_from_flags(flags: Mapping[str, Any]) -> ClassifierConfig:
    """`create_classifier` flags -> ClassifierConfig (64-channel heads, 1000 classes, as the
    original hard-codes)."""
    f = {**CLASSIFIER_DEFAULTS, **{k: v for k, v in flags.items() if k in CLASSIFIER_DEFAULTS}}
    size = int(flags.get("image_size", MODEL_DEFAULTS["image_size"]))
    return ClassifierConfig(
        image_size=size,
        in_channels=3,
        model_channels=int(f["classifier_width"]),
        out_channels=1000,
        num_res_blocks=int(f["classifier_depth"]),
        attention_ds=attention_ds(f["classifier_attention_resolutions"], size),
        channel_mult=_channel_mult("", size),
        num_head_channels=64,
        use_scale_shift_norm=bool(f["classifier_use_scale_shift_norm"]),
        resblock_updown=bool(f["classifier_resblock_updown"]),
        pool=f["classifier_pool"],
    )


def model_and_diffusion_from_flags(
    flags: Mapping[str, Any],
) -> tuple[UNetConfig | ClassifierConfig, DiffusionConfig]:
    """A whole pasted flag line: classifier flags give a ClassifierConfig, `large_size` a
    super-resolution UNetConfig, anything else the diffusion UNetConfig."""
    diffusion = diffusion_from_flags(flags)
    if any(k.startswith("classifier_") for k in flags):
        return classifier_from_flags(flags), diffusion
    if "large_size" in flags or "small_size" in flags:
        return superres_from_flags(flags)[0], diffusion
    return unet_from_flags(flags), diffusion


# ---- the original's constructor kwargs (UNetModel / SuperResModel / EncoderUNetModel) ------------

_UNET_MODEL_DEFAULTS: dict[str, Any] = {
    "dropout": 0.0,
    "channel_mult": (1, 2, 4, 8),
    "conv_resample": True,
    "use_checkpoint": False,
    "num_heads": 1,
    "num_head_channels": -1,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "use_new_attention_order": False,
}
ORIGINAL_CONSTRUCTOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "UNetModel": {**_UNET_MODEL_DEFAULTS, "num_classes": None, "num_heads_upsample": -1},
    "SuperResModel": {**_UNET_MODEL_DEFAULTS, "num_classes": None, "num_heads_upsample": -1},
    "EncoderUNetModel": {**_UNET_MODEL_DEFAULTS, "pool": "adaptive"},
}

_COMMON_KWARGS = {
    "image_size": "image_size",
    "in_channels": "in_channels",
    "model_channels": "model_channels",
    "out_channels": "out_channels",
    "num_res_blocks": "num_res_blocks",
    "dropout": "dropout",
    "conv_resample": "conv_resample",
    "num_heads": "num_heads",
    "use_checkpoint": "use_checkpoint",
    "use_scale_shift_norm": "use_scale_shift_norm",
    "resblock_updown": "resblock_updown",
    "use_new_attention_order": "use_new_attention_order",
}


def config_from_constructor(
    class_name: str, kwargs: Mapping[str, Any]
) -> UNetConfig | ClassifierConfig:
    """The original class name ("UNetModel", "SuperResModel", "EncoderUNetModel") and its
    constructor kwargs -> our config (attention_resolutions there are downsample factors)."""
    # Arguments left out take the original constructor's defaults, which differ from our
    # classifier defaults (those follow the released classifiers).
    kwargs = {**ORIGINAL_CONSTRUCTOR_DEFAULTS.get(class_name, {}), **kwargs}
    if kwargs.pop("dims", 2) != 2:
        raise ValueError("only 2-D networks are supported (dims=2)")
    kwargs.pop("use_fp16", None)  # precision is chosen at run time (torch.amp), not in the config
    out: dict[str, Any] = {}
    for key, value in list(kwargs.items()):
        if key in _COMMON_KWARGS:
            out[_COMMON_KWARGS[key]] = value
            del kwargs[key]
    out["attention_ds"] = tuple(int(d) for d in kwargs.pop("attention_resolutions", ()))
    out["channel_mult"] = tuple(kwargs.pop("channel_mult", (1, 2, 4, 8)))
    out["num_head_channels"] = _none_if_negative(kwargs.pop("num_head_channels", -1))
    if class_name in ("UNetModel", "SuperResModel"):
        out["num_classes"] = kwargs.pop("num_classes", None)
        out["num_heads_upsample"] = _none_if_negative(kwargs.pop("num_heads_upsample", -1))
        config: UNetConfig | ClassifierConfig = UNetConfig(**out)
    elif class_name == "EncoderUNetModel":
        kwargs.pop("num_heads_upsample", None)  # accepted and ignored by the original encoder
        out["pool"] = kwargs.pop("pool", "adaptive")
        config = ClassifierConfig(**out)
    else:
        raise ValueError(f"unknown original network class {class_name!r}")
    if kwargs:
        raise ValueError(f"unsupported {class_name} argument(s): {', '.join(sorted(kwargs))}")
    return config


def build_network(class_name: str, config: UNetConfig | ClassifierConfig) -> nn.Module:
    """Instantiate our module for an original class name with a translated config."""
    if class_name == "UNetModel":
        return UNet(config)
    if class_name == "SuperResModel":
        return SuperResUNet(config)
    if class_name == "EncoderUNetModel":
        return NoisyClassifier(config)
    raise ValueError(f"unknown original network class {class_name!r}")
