"""adm's network primitives against the plain PyTorch formulations, one training call at a time.

Each case builds one set of inputs, checks that adm's primitive and every alternative agree on
the output and on all gradients (to 1e-4 of each tensor's scale), then times interleaved rounds
of forward + backward (`timing.interleaved`: adm, alternative, ..., adm, alternative, ...) and
prints, per alternative, `timing.paired`: the median of the per-round ratios alternative / adm
(> 1: adm is faster) over the rounds where neither side took over 1.25x its best, their
min-max, the median over all rounds and the disturbed count; and each side's median time.

Float32 and NCHW, as `adm train` runs on the CPU; the shapes are the 33m config's (the released
64x64 model at 64 base channels) at batch 4, or tiny ones with `--quick`:

- `norm_silu_adagn`: `GroupNorm32.silu(h, scale, shift)` (a ResBlock's `out_layers`) against the
  original's `silu(norm(h) * (1 + scale) + shift)` through autograd;
- `norm_silu`: `GroupNorm32.silu(x)` (`in_layers`) against `silu(norm(x))`;
- `upsample`: `upsample_nearest2x` against `F.interpolate(mode="nearest")`;
- `qkv`: `pointwise` on an NCHW block's tokens (a strided view) against a linear layer on the
  same tokens and against the original's `Conv1d` on [N, C, L];
- `norm_qkv`: an attention block's GroupNorm and `qkv` on an NCHW activation, where the
  projection's backward hands the norm's backward its gradient: `pointwise` (`_Pointwise`, which
  returns it in NCHW) against the same batched matmul through autograd (which returns it
  transposed), a linear layer, and the original's `Conv1d`;
- `skip`: `Conv1x1` (a ResBlock's skip projection) against `F.conv2d`.

    python benchmarks/bench_primitives.py --threads 2            # the 33m shapes
    python benchmarks/bench_primitives.py --quick --repeats 3     # tiny shapes, a smoke run
    python benchmarks/bench_primitives.py --device cuda           # (gpu_check.sh runs this too)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# isort: off
import adm  # noqa: F401 - first: it sets OMP_WAIT_POLICY (unless set) before torch loads OpenMP
import torch
# isort: on

import timing
import torch.nn.functional as F
from torch import Tensor

from adm.nets.nn import Conv1x1, normalization, pointwise, upsample_nearest2x

Fn = Callable[[Sequence[Tensor]], Tensor]


@dataclass
class Case:
    """One primitive: its inputs and parameters (all get gradients), adm's call, alternatives."""

    name: str
    shape: str
    inputs: list[Tensor]
    params: list[Tensor]
    ours: Fn
    others: dict[str, Fn]
    layout: Callable[[Tensor], Tensor] = lambda out: out  # an alternative's output -> adm's

    @property
    def tensors(self) -> list[Tensor]:
        return self.inputs + self.params


def cases(quick: bool, device: str = "cpu") -> list[Case]:
    """The benchmark's cases at the 33m config's shapes (batch 4), or tiny ones, on `device`."""

    def _leaf(*shape: int, scale: float = 1.0, offset: float = 0.0) -> Tensor:
        return (torch.randn(*shape, device=device) * scale + offset).requires_grad_()

    n = 2 if quick else 4
    c, side, out = (64, 8, 32) if quick else (128, 32, 64)  # skip: [4, 192, 64, 64] -> 64
    norm = normalization(c).to(device)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
        norm.bias.normal_(0.0, 0.1)
    big = (n, c, 2 * side, 2 * side)  # the 64x64 level (tiny: 16x16)
    found = [
        Case(
            "norm_silu_adagn",
            str(list(big)),
            [_leaf(*big, scale=2, offset=1), _leaf(n, c, 1, 1, scale=0.1), _leaf(n, c, 1, 1)],
            list(norm.parameters()),
            lambda t: norm.silu(t[0], t[1], t[2]),
            {"original": lambda t: F.silu(norm(t[0]) * (1 + t[1]) + t[2])},
        ),
        Case(
            "norm_silu",
            str(list(big)),
            [_leaf(*big, scale=2, offset=1)],
            list(norm.parameters()),
            lambda t: norm.silu(t[0]),
            {"original": lambda t: F.silu(norm(t[0]))},
        ),
        Case(
            "upsample",
            str([n, c, side, side]),
            [_leaf(n, c, side, side)],
            [],
            lambda t: upsample_nearest2x(t[0]),
            {"interpolate": lambda t: F.interpolate(t[0], scale_factor=2, mode="nearest")},
        ),
    ]
    qkv = torch.nn.Conv1d(c, 3 * c, 1).to(device)
    length = side * side

    def conv1d_as_tokens(out: Tensor) -> Tensor:  # the original's [N, 3C, L] -> adm's [N, L, 3C]
        return out.transpose(1, 2) if out.shape[1] == 3 * c else out

    found.append(
        Case(
            "qkv",
            f"{[n, c, length]} -> {3 * c}",
            [_leaf(n, c, length)],
            list(qkv.parameters()),
            lambda t: pointwise(t[0].transpose(1, 2), qkv),
            {
                "linear": lambda t: F.linear(t[0].transpose(1, 2), qkv.weight[..., 0], qkv.bias),
                "conv1d (original)": lambda t: qkv(t[0]),
            },
            layout=conv1d_as_tokens,
        )
    )
    attn_norm = normalization(c).to(device)

    def tokens(t: Sequence[Tensor]) -> Tensor:  # the block's normalised tokens, [N, L, C]
        return attn_norm(t[0]).flatten(2).transpose(1, 2)

    def autograd_bmm(t: Sequence[Tensor]) -> Tensor:
        wt = qkv.weight[..., 0].t().expand(n, -1, -1)
        return torch.baddbmm(qkv.bias, tokens(t), wt)

    found.append(
        Case(
            "norm_qkv",
            f"{[n, c, side, side]} -> {3 * c}",
            [_leaf(n, c, side, side)],
            list(attn_norm.parameters()) + list(qkv.parameters()),
            lambda t: pointwise(tokens(t), qkv),
            {
                "bmm (autograd)": autograd_bmm,
                "linear": lambda t: F.linear(tokens(t), qkv.weight[..., 0], qkv.bias),
                "conv1d (original)": lambda t: qkv(attn_norm(t[0]).flatten(2)),
            },
            layout=conv1d_as_tokens,
        )
    )
    skip_in = 96 if quick else 192
    skip = Conv1x1(skip_in, out).to(device)
    found.append(
        Case(
            "skip",
            f"{[n, skip_in, 2 * side, 2 * side]} -> {out}",
            [_leaf(n, skip_in, 2 * side, 2 * side)],
            list(skip.parameters()),
            lambda t: skip(t[0]),
            {"conv2d": lambda t: F.conv2d(t[0], skip.weight, skip.bias)},
        )
    )
    return found


def _grads(case: Case, fn: Fn, grad: Tensor) -> list[Tensor]:
    out = case.layout(fn(case.inputs))
    return [out.detach(), *torch.autograd.grad(out, case.tensors, grad)]


def check(case: Case) -> float:
    """The largest difference, relative to each tensor's scale, between adm's output and
    gradients and every alternative's. Raises ValueError above 1e-4."""
    torch.manual_seed(0)
    ours = case.ours(case.inputs)
    grad = torch.randn_like(ours)
    want = _grads(case, case.ours, grad)
    worst = 0.0
    for name, fn in case.others.items():
        got = _grads(case, fn, grad)
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
            what = "the output" if i == 0 else f"gradient {i - 1}"
            if not err <= 1e-4:
                raise ValueError(
                    f"{case.name}: adm and {name} differ in {what} by {err:.2e} of its scale"
                )
            worst = max(worst, err)
    return worst


def measure(case: Case, repeats: int) -> dict[str, object]:
    """Interleaved forward + backward rounds of adm and each alternative; ratios per round."""
    grad = torch.randn_like(case.ours(case.inputs))

    def train(fn: Fn) -> Callable[[], object]:
        return lambda: torch.autograd.grad(case.layout(fn(case.inputs)), case.tensors, grad)

    calls = {"adm": train(case.ours)} | {k: train(f) for k, f in case.others.items()}
    timed = timing.interleaved(calls, repeats, warmup=2)
    ours = timed["adm"]
    row: dict[str, object] = {"adm_ms": 1e3 * statistics.median(ours.times)}
    for name in case.others:
        theirs = timed[name]
        row[name] = {"ms": 1e3 * statistics.median(theirs.times)} | timing.paired(ours, theirs)
    return row


def run(quick: bool, repeats: int, device: str = "cpu") -> tuple[str, dict[str, object]]:
    """Check and time every case: the report's text and its figures."""
    lines = []
    rows: dict[str, object] = {}
    for case in cases(quick, device):
        err = check(case)
        row = measure(case, repeats)
        row["agreement"] = err
        rows[case.name] = row
        lines.append(
            f"\n{case.name} {case.shape}: adm {row['adm_ms']:.2f} ms fwd+bwd (agree {err:.1e})"
        )
        for name in case.others:
            r = row[name]
            assert isinstance(r, dict)
            lines.append(
                f"  {name:18s} {r['ms']:8.2f} ms  {name}/adm {r['ratio']:.2f}x "
                f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f} over the undisturbed rounds; all "
                f"rounds {r['ratio_all_pairs']:.2f}x, {r['disturbed']}/{r['pairs']} disturbed)"
            )
    return "\n".join(lines), rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per case (15)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    torch.manual_seed(0)
    before = timing.machine()
    print(f"machine: {json.dumps(before)}; device {args.device}")
    text, rows = run(args.quick, args.repeats, args.device)
    print(text)
    after = timing.machine()
    print(f"\nload average at the end: {after['load_average']}")
    if args.json is not None:
        report = {"machine": before, "device": args.device, "load_end": after["load_average"]}
        report["cases"] = rows
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
