"""Checkpoints: the released `.pt` state dicts and adm's self-describing safetensors.

Loading never runs code (`torch.load(weights_only=True)`) and is always strict. A released file
needs no flags: its preset is recognised from the state dict's key names and shapes. adm's own
format is safetensors with the fully resolved preset as JSON metadata. Writes are atomic.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from adm._util.atomic import atomic_path
from adm.models.presets import (
    PRESETS,
    Preset,
    build_model,
    get_preset,
    num_outputs,
    preset_from_dict,
    preset_json,
    state_dict_shapes,
    with_outputs,
)

__all__ = [
    "CheckpointError",
    "bundled_names",
    "bundled_path",
    "convert",
    "default_cache_dir",
    "detect_preset",
    "load_model",
    "load_state_dict",
    "read_preset",
    "resolve_checkpoint",
    "save_model",
    "verify_file",
]

BUNDLED_DIR = Path(__file__).parent / "weights"  # the demo's self-trained models, in the package
METADATA_KEY = "adm_preset"  # safetensors metadata entry holding `preset_to_dict` as JSON
StateDict = dict[str, Tensor]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with a message naming the file and the reason."""


def bundled_names() -> tuple[str, ...]:
    """Names whose weights ship inside the package (the demo's models), usable like released
    names: `load_model("fmnist_diffusion")`, `adm sample --checkpoint fmnist_diffusion`."""
    return tuple(sorted(p.stem for p in BUNDLED_DIR.glob("*.safetensors")))


def bundled_path(name: str) -> Path | None:
    """The bundled file of a preset name ("fmnist_judge", also with a suffix), else None."""
    stem = str(name).removesuffix(".pt").removesuffix(".safetensors")
    path = BUNDLED_DIR / f"{stem}.safetensors"
    return path if stem in bundled_names() else None


def default_cache_dir() -> Path:
    """Where released checkpoints live: `$ADM_CACHE_DIR`, else `~/.cache/adm`."""
    return Path(os.environ.get("ADM_CACHE_DIR") or Path.home() / ".cache" / "adm").expanduser()


# ---- reading files -------------------------------------------------------------------------------


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Tensors of a `.pt` (torch.save of a state dict, loaded with weights_only) or `.safetensors`
    file, on the CPU. Anything else raises `CheckpointError` saying what the file seems to be."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    kind = sniff(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(path))
        except Exception as err:
            raise CheckpointError(
                f"{path}: damaged safetensors file ({short_reason(err)})"
            ) from None
    if kind not in ("torch zip", "torch legacy"):
        raise CheckpointError(f"{path}: not a checkpoint: it seems to be {kind}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" (it references {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused: the file holds pickled Python objects other than tensors{what}, "
            "and unpickling them could run code. adm loads plain state dicts only; if you trust "
            "the file, re-save `model.state_dict()` from it"
        ) from None
    except Exception as err:
        raise CheckpointError(
            f"{path}: damaged or truncated PyTorch file ({short_reason(err)}); if it was "
            "downloaded, download it again"
        ) from None
    return _as_state_dict(obj, path)


def sniff(path: Path) -> str:
    """What a file seems to be, from its first bytes: "safetensors", "torch zip", "torch legacy",
    or a description such as "an HTML page"."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4096)
    if size == 0:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return _sniff_zip(path)
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "torch legacy"  # a pickle stream: torch.save before 1.6, or plain pickle
    if len(head) >= 10 and head[8:10] in (b'{"', b"{ "):
        header_len = int.from_bytes(head[:8], "little")
        if header_len + 8 <= size:
            return "safetensors"
        return "a truncated safetensors file (an interrupted download?)"
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"unrecognised binary data (first bytes {head[:8].hex(' ')})"
    first = text.strip().splitlines()[0][:60] if text.strip() else ""
    if "<html" in text.lower() or "<!doctype" in text.lower() or "<?xml" in text.lower():
        return f"an HTML/XML page, not weights (a failed download or an error page?): {first!r}"
    return f"a text file starting {first!r}"


_MAGIC = {
    b"\x1f\x8b": "a gzip archive (unpack it first)",
    b"\x93NUMPY": "a NumPy .npy array",
    b"\x89HDF": "an HDF5 file (e.g. Keras/TensorFlow weights)",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
}


def _sniff_zip(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    # NotImplementedError: zipfile's answer to a garbled "version needed to extract" field
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError):
        return "a truncated or damaged zip archive (an interrupted download?)"
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return "torch zip"
    if names and all(n.endswith(".npy") for n in names):
        return f"a NumPy .npz archive with arrays {', '.join(n[:-4] for n in names[:4])}"
    return "a zip archive that is not a PyTorch checkpoint"


def _as_state_dict(obj: object, path: Path) -> StateDict:
    if isinstance(obj, Mapping):
        if {"state", "param_groups"} <= set(obj):
            raise CheckpointError(
                f"{path}: this is an optimizer state (like the original's opt*.pt), not model "
                "weights; use the model*.pt or ema_*.pt file saved next to it"
            )
        bad = next((k for k, v in obj.items() if not isinstance(v, Tensor)), None)
        if bad is None and all(isinstance(k, str) for k in obj):
            return dict(obj)
        if bad is not None and isinstance(obj[bad], Mapping):
            raise CheckpointError(
                f"{path}: a training checkpoint that wraps its weights under {bad!r}; save "
                f"`checkpoint[{bad!r}]` on its own (a plain state dict) and load that"
            )
        raise CheckpointError(
            f"{path}: not a state dict: entry {bad!r} is a {type(obj.get(bad)).__name__}, "
            "not a tensor"
        )
    raise CheckpointError(f"{path}: not a state dict but a {type(obj).__name__}")


def read_preset(path: str | os.PathLike) -> Preset | None:
    """The preset stored in an adm safetensors file's metadata (None for other files)."""
    path = Path(path)
    if sniff(path) != "safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as err:
        raise CheckpointError(f"{path}: damaged safetensors file ({short_reason(err)})") from None
    if text is None:
        return None
    try:
        return preset_from_dict(json.loads(text))
    except ValueError as err:
        raise CheckpointError(f"{path}: unreadable adm config in the metadata ({err})") from None


# ---- recognising presets -------------------------------------------------------------------------


def _shapes(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def fit_differences(state_dict: Mapping[str, Tensor], preset: Preset) -> list[str]:
    """Why `state_dict` would not load into `preset`'s network ([] when it fits): missing and
    unexpected keys and shape mismatches, readable ("out.0.weight: (64,) here, (32,) expected")."""
    return _differences(_shapes(state_dict), state_dict_shapes(preset.network, preset.kind))


def _differences(
    actual: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Human-readable differences between two key -> shape maps, in the expected key order."""
    out = []
    for key, shape in expected.items():
        if key not in actual:
            out.append(f"missing {key} {list(shape)}")
        elif actual[key] != shape:
            out.append(f"{key} is {list(actual[key])}, expected {list(shape)}")
    out += [f"unexpected {k} {list(s)}" for k, s in actual.items() if k not in expected]
    return out


def matching_presets(state_dict: Mapping[str, Tensor]) -> list[Preset]:
    """Every preset whose network has exactly these keys and shapes (several presets share one
    architecture: 256x256_diffusion_uncond and the four LSUN models)."""
    shapes = _shapes(state_dict)
    return [
        p
        for p in PRESETS.values()
        if _stem_shapes(p).items() <= shapes.items()  # cheap necessary condition first
        and state_dict_shapes(p.network, p.kind) == shapes
    ]


def _stem_shapes(preset: Preset) -> dict[str, tuple[int, ...]]:
    """Shapes of the time embedding and the first conv, computed without building the network."""
    net, mc = preset.network, preset.network.model_channels
    in_channels = net.in_channels * (2 if preset.kind == "superres" else 1)
    return {
        "time_embed.0.weight": (4 * mc, mc),
        "input_blocks.0.0.weight": (int(net.channel_mult[0] * mc), in_channels, 3, 3),
    }


def _refitted_presets(state_dict: Mapping[str, Tensor]) -> list[Preset]:
    """Presets that fit once their label count is set to the file's, as training with
    `--fit-classes` does (a plain `.pt` has no metadata to say so): the rows of `label_emb` for a
    UNet, the length of the last tensor (the logits' bias) for a classifier."""
    shapes = _shapes(state_dict)
    if not shapes:
        return []
    last = shapes[next(reversed(shapes))]
    found = []
    for preset in PRESETS.values():
        if not _stem_shapes(preset).items() <= shapes.items():
            continue
        if preset.kind == "classifier":
            n = last[0] if len(last) == 1 else None
        else:
            n = shapes.get("label_emb.weight", (None,))[0]
        if n is None or n < 1 or n == num_outputs(preset):
            continue
        fitted = with_outputs(preset, n)
        if state_dict_shapes(fitted.network, fitted.kind) == shapes:
            found.append(fitted)
    return found


def detect_preset(state_dict: Mapping[str, Tensor], *, hint: str | None = None) -> Preset:
    """The preset a state dict belongs to, from its key names and shapes alone.

    Presets sharing an architecture are told apart by `hint` (e.g. the file stem "lsun_cat"),
    else the first in `PRESETS` order is returned. No fit raises `ValueError` naming the closest
    preset and its first differences.
    """
    found = matching_presets(state_dict) or _refitted_presets(state_dict)
    if found:
        return next((p for p in found if p.name == hint), found[0])
    shapes = _shapes(state_dict)
    if shapes and all(k.startswith("module.") for k in shapes):
        raise ValueError(
            "the keys start with 'module.' (saved from a DistributedDataParallel wrapper): "
            "strip that prefix and save the plain state dict"
        )
    scored = []
    for preset in PRESETS.values():
        diffs = _differences(shapes, state_dict_shapes(preset.network, preset.kind))
        scored.append((len(diffs), preset.name, diffs))
    count, name, diffs = min(scored, key=lambda s: s[0])
    params = sum(t.numel() for t in state_dict.values())
    raise ValueError(
        f"the state dict ({len(shapes)} tensors, {params:,} parameters) fits no preset; closest "
        f"is {name} with {count} difference(s): {'; '.join(diffs[:5])}"
        + ("; ..." if count > 5 else "")
        + ". For a modified preset, pass it explicitly (preset=..., or --set/--flags on the CLI)"
    )


# ---- loading and saving models -------------------------------------------------------------------


def resolve_checkpoint(
    name_or_path: str | os.PathLike, cache: str | os.PathLike | None = None
) -> Path:
    """The file to load for `name_or_path`: an existing file; else the weights bundled with the
    package under that name (`bundled_names()`); else the cached file of a released preset
    (where `adm fetch NAME` puts it)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = bundled_path(str(name_or_path))
    if bundled is not None:
        return bundled
    try:
        preset = get_preset(str(name_or_path))
    except ValueError as err:
        raise CheckpointError(f"{name_or_path}: no such file, and {err}") from None
    folder = Path(cache) if cache is not None else default_cache_dir()
    for suffix in (".safetensors", ".pt"):
        candidate = folder / f"{preset.name}{suffix}"
        if candidate.is_file():
            return candidate
    if preset.url is None:
        raise CheckpointError(
            f"{preset.name} has no released weights and none bundled with adm (bundled: "
            f"{', '.join(bundled_names())}): pass a checkpoint file you trained, or build it with "
            f"random weights (`--preset {preset.name}` on the command line, "
            "adm.models.presets.build_model in Python)"
        )
    raise CheckpointError(
        f"{preset.name} is not downloaded: run `adm fetch {preset.name}`, or put the file from "
        f"{preset.url} at {folder / (preset.name + '.pt')}"
    )


def load_model(
    path_or_preset_name: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    preset: Preset | str | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> tuple[nn.Module, Preset]:
    """Load a checkpoint with no flags: `load_model("256x256_diffusion.pt")`, `load_model(
    "model.safetensors")`, `load_model("256x256_classifier")` (from the cache folder) or
    `load_model("fmnist_diffusion")` (bundled with the package; see `resolve_checkpoint`).

    The preset comes from `preset`, else the safetensors metadata, else the key names and shapes
    (the file stem breaks ties between presets of one architecture). Loading is strict; the model
    is returned in eval mode on `device`, its floating-point weights cast to `dtype` (None keeps
    the file's dtypes).
    """
    path = resolve_checkpoint(path_or_preset_name)
    state_dict = load_state_dict(path)
    if isinstance(preset, str):
        preset = get_preset(preset)
    if preset is None:
        preset = read_preset(path)
    if preset is None:
        try:
            preset = detect_preset(state_dict, hint=path.stem)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
    expected = state_dict_shapes(preset.network, preset.kind)
    diffs = _differences(_shapes(state_dict), expected)
    if diffs:
        raise CheckpointError(
            f"{path}: does not fit preset {preset.name!r}: {'; '.join(diffs[:5])}"
            + ("; ..." if len(diffs) > 5 else "")
        )
    _check_finite(path, state_dict)
    model = build_model(preset, device="meta")
    model.load_state_dict(state_dict, strict=True, assign=True)
    model = model.to(device=device or "cpu")
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval(), preset


def _check_finite(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """A damaged or diverged checkpoint (NaN or inf in a weight) is refused at load, not after
    it has sampled black images or trained on."""
    bad = [k for k, t in state_dict.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} tensor(s) hold NaN or inf values (e.g. {bad[0]}): the checkpoint "
            "is damaged or comes from a diverged training run"
        )


def save_model(model: nn.Module, preset: Preset, path: str | os.PathLike) -> Path:
    """Write `model`'s weights atomically: `.safetensors` with the preset as metadata (adm's
    format), or `.pt` (a plain state dict, the original's format, loadable by its code)."""
    config = getattr(model, "config", preset.network)
    if config != preset.network:
        raise ValueError(f"the model's config differs from preset {preset.name!r}'s network")
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    return write_state_dict(state_dict, preset, path)


def write_state_dict(
    state_dict: Mapping[str, Tensor], preset: Preset, path: str | os.PathLike
) -> Path:
    """Atomically write a state dict for `preset` (checked against its keys and shapes)."""
    path = Path(path)
    expected = state_dict_shapes(preset.network, preset.kind)
    diffs = _differences(_shapes(state_dict), expected)
    if diffs:
        raise ValueError(f"state dict does not fit preset {preset.name!r}: {'; '.join(diffs[:5])}")
    if any(t.is_meta for t in state_dict.values()):
        raise ValueError("cannot save meta tensors (weights were never materialised)")
    # In the original's key order (safetensors files list their keys sorted).
    tensors = {k: state_dict[k].detach().to("cpu").contiguous() for k in expected}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": "pt", METADATA_KEY: preset_json(preset)}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)
    elif path.suffix == ".pt":
        with atomic_path(path) as tmp:
            torch.save(tensors, tmp)
    else:
        raise ValueError(f"{path}: unknown checkpoint format: use .safetensors or .pt")
    return path


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    preset: Preset | str | None = None,
    dtype: torch.dtype | None = None,
) -> Preset:
    """`.pt` <-> `.safetensors` (either direction) without building a model; returns the preset."""
    src = Path(src)
    state_dict = load_state_dict(src)
    if isinstance(preset, str):
        preset = get_preset(preset)
    preset = preset or read_preset(src)
    if preset is None:
        try:
            preset = detect_preset(state_dict, hint=src.stem)
        except ValueError as err:
            raise CheckpointError(f"{src}: {err}") from None
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    write_state_dict(state_dict, preset, dst)
    return preset


def verify_file(path: Path, preset: Preset) -> None:
    """Raise `CheckpointError` unless `path` holds `preset`'s keys and shapes."""
    diffs = _differences(
        _shapes(load_state_dict(path)), state_dict_shapes(preset.network, preset.kind)
    )
    if diffs:
        raise CheckpointError(
            f"{path}: keys/shapes differ from preset {preset.name!r}: {'; '.join(diffs[:3])}"
        )


def short_reason(err: BaseException) -> str:
    """One line naming an exception, for messages that must stay short."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]
