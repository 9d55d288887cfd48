"""`adm sweep`: parse the lists of solvers, grids, steps, scales, intervals and seeds into a
`SweepSettings`, check every value against the model before any work, then one call into
`adm.cli.sweep_run` (cells, sampling, measuring, resume) and `adm.cli.sweep_report`. Registered by
`adm.cli.main`; no torch import at module level (the parser is built on every `adm` call).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adm._util.errors import UserError
from adm.cli import checks
from adm.cli.sweep_run import Interval, SweepSettings

SWEEP_EXAMPLES = """examples:
  adm sweep                                        # the default grid on the bundled models
  adm sweep --solvers dpm++2m,unipc --grids karras --steps 8,10,15 --scales 4 --out runs/s
  adm sweep --solvers ddim --grids ddim --steps 25 --out runs/s   # add cells to the same run
  adm sweep --solvers dpm++2m --intervals none,0.5:10 --seeds 0,1,2 --reference none
  adm sweep --solvers unipc:order=3,edm:churn=40,heun --grids karras --steps 10 --out runs/s
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    d = SweepSettings()
    p = sub.add_parser(
        "sweep",
        help="sampler x grid x steps x guidance scale, each cell measured (sweep.json/.md/.png)",
        description="Sample every combination of solver, timestep grid, number of steps, "
        "classifier-guidance scale and guidance interval (plus the DDPM-250 reference at each "
        "scale) with the same per-sample noise, and measure each cell: on the bundled "
        "Fashion-MNIST models with the demo's judge (accuracy, FID, precision, recall), for "
        "--checkpoint with adm eval's Inception metrics against --ref-batch. Resumable: cells "
        "already in OUT/sweep.json are skipped. docs/sampling.md.",
        epilog=SWEEP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--solvers", default=",".join(d.solvers), help="samplers, each optionally "
                   "with its options: unipc:order=3, edm:churn=40:s_noise=1.003, ddim:eta=1 "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--grids", default=",".join(d.grids), help="default: %(default)s")
    p.add_argument("--steps", default=_join(d.steps), help="grid sizes (default: %(default)s)")
    p.add_argument("--scales", default=_join(d.scales), help="classifier-guidance scales "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--intervals", default="none", help="guidance intervals LO:HI in sigma, or "
                   "none (always on), e.g. none,0.5:10 (default: %(default)s)")  # fmt: skip
    p.add_argument("--seeds", default=_join(d.seeds), help="each cell is drawn once per seed and "
                   "reported as mean and spread (default: %(default)s)")  # fmt: skip
    p.add_argument("--per-class", type=int, default=d.per_class,
                   help="samples per class and cell (default: %(default)s)")  # fmt: skip
    p.add_argument("--eta", type=float, help="eta of ddim and dpm++2m-sde, 0..1 (default: each "
                   "sampler's own, 0 and 1); other samplers ignore it")  # fmt: skip
    p.add_argument("--reference", default="ddpm:250", help="SOLVER:STEPS on the uniform grid, "
                   "run at every scale, or none (default: %(default)s)")  # fmt: skip
    p.add_argument("--out", default="runs/sweep", help="output folder (default: %(default)s)")
    p.add_argument("--data", help="folder with the Fashion-MNIST IDX files (else searched)")
    p.add_argument("--weights", help="folder with the three demo .safetensors (default: bundled)")
    p.add_argument("--classes", help="requested classes, e.g. 0,3,7 (default: all)")
    g = p.add_argument_group("another model (default: the bundled Fashion-MNIST models)")
    g.add_argument("--checkpoint", help="diffusion checkpoint file or released name; cells are "
                   "scored with adm eval's Inception metrics against --ref-batch")  # fmt: skip
    g.add_argument("--classifier", help="its noisy classifier (needed for scales > 0)")
    g.add_argument("--ref-batch", help="reference batch .npz, as for adm eval")
    g.add_argument("--inception-weights", metavar="PATH", help="as for adm eval (default: "
                   "$ADM_CACHE_DIR or ~/.cache/adm, downloaded if missing)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=100, help="samples per network call "
                   "(default: %(default)s; images do not depend on it)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", action="store_true", help=checks.COMPILE_HELP)
    p.set_defaults(func=_cmd_sweep, stops_cleanly=True)  # run_sweep locks the folder itself


def _join(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _items(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise UserError(f"{flag} {text!r}: expected a comma-separated list")
    return items


def _numbers(text: str, flag: str, kind: type) -> tuple:
    try:
        return tuple(kind(item) for item in _items(text, flag))
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise UserError(f"{flag} {text!r}: expected {what} such as 10,20") from None


def _names(text: str, flag: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(_items(text, flag)))
    for name in names:
        if name not in allowed:
            raise UserError(f"{flag}: unknown {flag[2:-1]} {name!r} (expected one of "
                            f"{', '.join(allowed)})")  # fmt: skip
    return names


def _solvers(text: str) -> tuple[str, ...]:
    """Sampler names, each optionally with its options: `unipc:order=3`, `edm:churn=40`."""
    from adm.cli.sweep_run import solver_spec
    from adm.diffusion.registry import SAMPLER_NAMES

    specs = tuple(dict.fromkeys(_items(text, "--solvers")))
    for spec in specs:
        if spec.split(":")[0] not in SAMPLER_NAMES:
            _names(spec.split(":")[0], "--solvers", SAMPLER_NAMES)  # the unknown-name message
        try:
            solver_spec(spec)
        except ValueError as err:
            raise UserError(f"--solvers {spec!r}: {err}") from None
    return specs


def _intervals(text: str) -> tuple[Interval, ...]:
    out: list[Interval] = []
    for item in _items(text, "--intervals"):
        if item.lower() == "none":
            out.append(None)
            continue
        try:
            lo, hi = (float(v) for v in item.split(":"))
        except ValueError:
            raise UserError(f"--intervals {item!r}: expected LO:HI (in sigma) or none") from None
        if not 0 <= lo <= hi:
            raise UserError(f"--intervals {item!r}: needs 0 <= LO <= HI")
        out.append((lo, hi))
    return tuple(dict.fromkeys(out))


def _reference(text: str, solvers: tuple[str, ...]) -> tuple[str, int] | None:
    if text.lower() == "none":
        return None
    solver, _, steps = text.partition(":")
    if solver not in solvers or not steps.isdigit():
        raise UserError(f"--reference {text!r}: expected SOLVER:STEPS such as ddpm:250, or none")
    return solver, int(steps)


def settings_from_args(args: argparse.Namespace) -> SweepSettings:
    from adm.diffusion.grids import GRIDS
    from adm.diffusion.registry import SAMPLER_NAMES

    return SweepSettings(
        solvers=_solvers(args.solvers),
        grids=_names(args.grids, "--grids", GRIDS),
        steps=tuple(dict.fromkeys(_numbers(args.steps, "--steps", int))),
        scales=tuple(dict.fromkeys(_numbers(args.scales, "--scales", float))),
        intervals=_intervals(args.intervals),
        seeds=tuple(dict.fromkeys(_numbers(args.seeds, "--seeds", int))),
        per_class=args.per_class,
        eta=args.eta,
        reference=_reference(args.reference, SAMPLER_NAMES),
    )


def _cmd_sweep(args: argparse.Namespace) -> int:
    import torch

    from adm.cli import sweep_report, sweep_run
    from adm.evaluation.inception import WeightsError

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    settings = settings_from_args(args)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise UserError(f"--device {args.device}: {err}") from None
    out = Path(args.out)
    try:
        if args.checkpoint:
            settings, subject = _checkpoint_subject(args, settings, device, out)
        else:
            settings, subject = _bundled_subject(args, settings, device, out)
        result = sweep_run.run_sweep(out, settings, subject, batch_size=args.batch_size,
                                     progress=not args.no_progress)  # fmt: skip
    except (ValueError, OSError, WeightsError) as err:  # DataError, BatchError are ValueErrors
        raise UserError(str(err)) from None
    print(sweep_report.table(result["rows"]))
    print(f"\n{result['new']} new cell(s); {out / 'sweep.json'}, {out / 'sweep.md'}, "
          f"{out / 'sweep.png'}")  # fmt: skip
    return 0


def _bundled_subject(args, settings: SweepSettings, device, out: Path):
    """The demo's models: every value checked, and an existing sweep.json, before any work."""
    from adm.cli import demo, sweep_run, sweep_subjects

    for flag in ("classifier", "ref_batch", "inception_weights"):
        if getattr(args, flag):
            raise UserError(f"--{flag.replace('_', '-')} goes with --checkpoint")
    settings = _with_classes(settings, args.classes, 10)
    weights = Path(args.weights) if args.weights else demo.WEIGHTS_DIR
    sweep_run.check_settings(settings, sweep_subjects.bundled_diffusion(weights))
    sweep_run.read_rows(out / "sweep.json", sweep_subjects.bundled_setup(settings, weights))
    subject = sweep_subjects.bundled_subject(
        settings, weights, args.data, device, compile=args.compile
    )
    return settings, subject


def _checkpoint_subject(args, settings: SweepSettings, device, out: Path):
    """Any diffusion checkpoint with a noisy classifier, scored with the Inception metrics."""
    from adm.cli import sweep_run, sweep_subjects

    if not args.ref_batch:
        raise UserError("--checkpoint needs --ref-batch REF.npz (the Inception metrics' reference)")
    if args.weights or args.data:
        raise UserError("--weights and --data are for the bundled models, not --checkpoint")
    inputs = sweep_subjects.CheckpointInputs(
        args.checkpoint, args.classifier, args.ref_batch, args.inception_weights
    )
    models = sweep_subjects.load_checkpoint_models(inputs, device, compile=args.compile)
    settings = _with_classes(settings, args.classes, models.num_classes)
    if models.classifier is None and any(settings.scales):
        raise UserError("guidance scales > 0 need --classifier (or give --scales 0)")
    sweep_run.check_settings(settings, models.diffusion)
    sweep_run.read_rows(out / "sweep.json", sweep_subjects.checkpoint_setup(settings, inputs))
    subject = sweep_subjects.checkpoint_subject(
        settings, inputs, models, device, batch_size=args.batch_size,
        progress=not args.no_progress,
    )  # fmt: skip
    return settings, subject


def _with_classes(settings: SweepSettings, text: str | None, num_classes: int) -> SweepSettings:
    import dataclasses

    if text is None:
        return dataclasses.replace(settings, classes=tuple(range(num_classes)))
    classes = tuple(dict.fromkeys(_numbers(text, "--classes", int)))
    if min(classes) < 0 or max(classes) >= num_classes:
        raise UserError(f"--classes {text!r}: classes are 0..{num_classes - 1}")
    return dataclasses.replace(settings, classes=classes)
