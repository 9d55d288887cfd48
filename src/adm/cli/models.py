"""`adm presets`, `adm info`, `adm convert`, `adm fetch`: the released models and checkpoint files.

Argument parsing and printing only; the work is done by `adm.models.presets`,
`adm.models.checkpoint` and `adm.models.fetch`.
Registered by `adm.cli.main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

from adm._util.errors import UserError, os_error_text
from adm.cli import checks


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_presets_command(sub)
    _add_info_command(sub)
    _add_convert_command(sub)
    _add_fetch_command(sub)


def _add_presets_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "presets",
        help="list the released, bundled and tiny presets: sizes, recipes, where weights come from",
        description="Every released checkpoint of the paper, keyed by its file stem, with exact "
        "parameter counts, the paper's FID and the README's sampling recipe; and where each "
        "preset's weights come from: released (adm fetch NAME downloads them), bundled (inside "
        "adm: pass the name, e.g. adm sample --checkpoint fmnist_diffusion) or none (tiny test "
        "presets: random weights with --preset NAME).",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_presets)


def _cmd_presets(args: argparse.Namespace) -> int:
    from adm.models.presets import PRESETS, preset_to_dict

    if args.json:
        out = {
            n: {**preset_to_dict(p), "num_parameters": p.num_parameters, "weights": _weights(p)}
            for n, p in PRESETS.items()
        }
        print(json.dumps(out, indent=2))
        return 0
    rows = [("name", "kind", "resolution", "parameters", "weights", "paper FID",
             "recommended sampling")]  # fmt: skip
    for p in PRESETS.values():
        fid = f"{p.paper_fid:.2f}" if p.paper_fid is not None else "-"
        sampling = "-" if p.kind == "classifier" else _recipe(p)
        rows.append((p.name, p.kind, _resolution(p), f"{p.num_parameters:,}", _weights(p), fid,
                     sampling))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.rjust(w) if j in (3, 5) else c.ljust(w) for j, (c, w) in
                        enumerate(zip(row, widths, strict=True))).rstrip())  # fmt: skip
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "\nweights: released = `adm fetch NAME` downloads them; bundled = inside adm, use the name "
        "(adm sample --checkpoint fmnist_diffusion --classifier fmnist_classifier, adm info "
        "fmnist_judge); none = random weights with --preset NAME (tests, smoke runs)"
    )
    return 0


def _weights(preset) -> str:
    """Where a preset's weights come from: "released", "bundled" or "none"."""
    from adm.models.checkpoint import bundled_path

    if preset.url:
        return "released"
    return "bundled" if bundled_path(preset.name) else "none"


def _resolution(preset) -> str:
    size = preset.image_size
    return f"{preset.small_size}->{size}" if preset.small_size else f"{size}x{size}"


def _recipe(preset) -> str:
    s = preset.sampling
    text = f"{s.sampler.upper()} {s.steps.removeprefix('ddim')} steps"
    if s.classifier and s.classifier_scale:
        text += f", {s.classifier} scale {s.classifier_scale}"
    return text


def _add_info_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="describe a preset or a checkpoint file: preset, config, parameters, dtype",
        description="Print the preset a name or checkpoint resolves to (recognised from the key "
        "names and shapes, or read from adm safetensors metadata), its full config, the exact "
        "parameter count and the dtype. --set and the original's flags show the effect of "
        "overrides, e.g. `adm info 256x256_diffusion --set unet.dropout=0.1`.",
    )
    p.add_argument("target", metavar="PRESET_OR_CKPT", help="preset name or .pt/.safetensors "
                   "file; a bundled name (fmnist_judge) describes its bundled file")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info, accepts_original_flags=True)


def _cmd_info(args: argparse.Namespace) -> int:
    from adm.models import checkpoint, presets
    from adm.models.overrides import apply_overrides

    path = Path(args.target)
    bundled = None if path.is_file() else checkpoint.bundled_path(args.target)
    path = bundled or path
    file_info: dict[str, object] = {}
    mismatch: list[str] = []
    try:
        if path.is_file():
            state_dict = checkpoint.load_state_dict(path)
            preset = checkpoint.read_preset(path)
            source = "adm metadata"
            if preset is None:
                preset = checkpoint.detect_preset(state_dict, hint=path.stem)
                source = "recognised from key names and shapes"
                twins = [p.name for p in checkpoint.matching_presets(state_dict)]
                if len(twins) > 1:
                    source += f" (same architecture: {', '.join(twins)})"
            mismatch = checkpoint.fit_differences(state_dict, preset)
            changed = _changes_from_named(preset)
            if changed:
                source += f" (modified from {preset.name}: {'; '.join(changed)})"
            elif preset.name not in presets.PRESETS:
                source += " (a config of its own, not one of adm's presets)"
            dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in state_dict.values())
            mixed = len(dtypes) > 1
            file_info = {
                "file": str(path) + (" (bundled with adm)" if bundled else ""),
                "preset_source": source,
                "num_tensors": len(state_dict),
                "dtype": ", ".join(f"{d} ({n} tensors)" if mixed else d for d, n in dtypes.items()),
            }
            params = sum(t.numel() for t in state_dict.values())
        else:
            preset = presets.get_preset(args.target)
            file_info = {"dtype": "float32 (as released)"}
            params = None
        overrides = [*args.set, *args.original_flags]
        if overrides:
            preset = apply_overrides(preset, overrides)
            file_info["overrides"] = " ".join(overrides)
        if params is None:
            params = preset.num_parameters
    except ValueError as err:
        raise UserError(str(err)) from None
    if mismatch:  # adm metadata that the weights contradict: no command will load this file
        print(
            f"warning: {path}: the weights do not fit the config in its metadata "
            f"({'; '.join(mismatch[:3])}{'; ...' if len(mismatch) > 3 else ''}); no adm command "
            "will load this file",
            file=sys.stderr,
        )
    if args.json:
        info = {**file_info, "num_parameters": params, "preset": presets.preset_to_dict(preset)}
        print(json.dumps(info, indent=2))
        return 1 if mismatch else 0
    lines = [
        ("preset", f"{preset.name}" + (f" ({preset.description})" if preset.description else "")),
        ("kind", f"{preset.kind}, {_resolution(preset)}"),
        *[(k.replace("_", " "), str(v)) for k, v in file_info.items()],
        ("parameters", f"{params:,}"),
        ("paper FID", "-" if preset.paper_fid is None else f"{preset.paper_fid:.2f}"),
        ("url", preset.url or _unreleased(preset)),
    ]
    if preset.kind != "classifier":
        lines.append(("sampling", _recipe(preset)))
    for key, value in lines:
        print(f"{key:<13} {value}")
    for section in ("network", "diffusion", "sampling"):
        config = getattr(preset, section)
        print(f"\n[{section}: {type(config).__name__}]")
        for f in dataclasses.fields(config):
            print(f"  {f.name:<24} {getattr(config, f.name)!r}")
    return 1 if mismatch else 0


def _changes_from_named(preset) -> list[str]:
    """The network fields in which `preset` differs from the named preset it derives from
    (`--set`, `--fit-classes`), as "field base -> value"; [] for an unknown name."""
    from adm.models import presets

    base = presets.PRESETS.get(preset.name)
    if base is None or type(base.network) is not type(preset.network):
        return []
    return [
        f"{f.name} {getattr(base.network, f.name)!r} -> {getattr(preset.network, f.name)!r}"
        for f in dataclasses.fields(preset.network)
        if getattr(base.network, f.name) != getattr(preset.network, f.name)
    ]


def _unreleased(preset) -> str:
    if _weights(preset) == "bundled":
        return "- (not released; weights bundled with adm)"
    return "- (not released; random weights with --preset)"


def _add_convert_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between .pt (the original's format) and .safetensors",
        description="Convert IN to OUT, chosen by OUT's suffix: .safetensors (adm's format, with "
        "the resolved preset as metadata) or .pt (a plain state dict the original code loads). "
        "The preset is read from IN's metadata or recognised from its keys and shapes.",
    )
    p.add_argument("src", metavar="IN", help=".pt or .safetensors checkpoint")
    p.add_argument("dst", metavar="OUT", help="output .safetensors or .pt")
    p.add_argument("--preset", help="preset to record (default: recognised; breaks ties such as "
                   "lsun_cat vs lsun_horse when the file name does not)")  # fmt: skip
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast floating tensors")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from adm.models import checkpoint

    src, dst = Path(args.src), Path(args.dst)
    if dst.suffix not in (".pt", ".safetensors"):
        raise UserError(f"{dst}: OUT must end in .safetensors or .pt")
    if dst.is_dir():
        raise UserError(f"{dst} is a folder: OUT must be a file name ending in .safetensors or .pt")
    if dst.exists() and not args.force:
        raise UserError(f"{dst} exists; pass --force to overwrite it")
    if dst.resolve() == src.resolve():
        raise UserError("IN and OUT are the same file")
    checks.writable_dir(dst.parent)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    try:
        preset = checkpoint.convert(src, dst, preset=args.preset, dtype=dtype)
    except ValueError as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise UserError(os_error_text(err)) from None
    print(f"wrote {dst} ({preset.name}, {dst.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _add_fetch_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fetch",
        help="download released checkpoints into the cache folder",
        description="Download released checkpoints from the original's public URLs into the cache "
        "folder ($ADM_CACHE_DIR or ~/.cache/adm), resuming partial downloads and checking "
        "length, keys and shapes before the file is put in place. NAME 'all' fetches all 15.",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="released file stem, or 'all'")
    p.add_argument("--cache-dir", help="folder for the checkpoints (default: $ADM_CACHE_DIR)")
    p.add_argument("--url", help="download from this URL instead (one NAME only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fetch)


def _cmd_fetch(args: argparse.Namespace) -> int:
    from adm.models.checkpoint import BUNDLED_DIR, bundled_path, default_cache_dir
    from adm.models.fetch import fetch
    from adm.models.presets import RELEASED

    names = list(RELEASED) if args.names == ["all"] else args.names
    if args.url and len(names) != 1:
        raise UserError("--url needs exactly one NAME")
    if not all(bundled_path(n) for n in names):
        checks.writable_dir(args.cache_dir or default_cache_dir(), "cache folder")
    for name in names:
        try:
            path = fetch(
                name, cache_dir=args.cache_dir, url=args.url, progress=not args.no_progress
            )
        except ValueError as err:
            raise UserError(str(err)) from None
        except OSError as err:
            raise UserError(os_error_text(err)) from None
        bundled = " (bundled with adm: nothing to download)" if path.parent == BUNDLED_DIR else ""
        print(f"{name}: {path}{bundled}")
    return 0
