"""`adm sweep`'s report: rows of sweep.json summarised per cell (mean and spread over seeds), the
Markdown table of sweep.md with each cell's FID relative to the reference at its scale, the best
cell within an NFE budget, and sweep.png (FID against NFE, one line per solver and grid, one panel
per guidance scale and interval). Plain Python + matplotlib (Agg); no torch.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from adm._util.atomic import atomic_path

CELL_FIELDS = ("cell", "solver", "grid", "steps", "nfe", "scale", "interval", "eta", "reference")
METRICS = ("accuracy", "fid", "precision", "recall")
BUDGETS = (10, 20)  # the NFE budgets of issue 11


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per cell: its fields, `seeds`, each metric's mean and `<metric>_std` (sample
    standard deviation over seeds; None for one seed), mean `seconds` per seed, and `fid_ratio`:
    FID / the reference cell's mean FID at the same scale over the same seeds (None where the
    reference lacks one of them): the same noise on both sides, so the ratio is paired."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["cell"], []).append(row)
    out = []
    for group in groups.values():
        entry = {k: group[0][k] for k in CELL_FIELDS}
        entry["seeds"] = sorted(r["seed"] for r in group)
        for metric in [m for m in METRICS if m in group[0]] + ["seconds"]:
            values = [r[metric] for r in group]
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out.append(entry)
    ref_fid = {(r["scale"], r["seed"]): r["fid"] for r in rows if r["reference"]}
    for entry in out:  # paired: the reference's FID over the same seeds as the cell
        refs = [ref_fid.get((entry["scale"], seed)) for seed in entry["seeds"]]
        ok = refs and None not in refs and statistics.fmean(refs) > 0
        entry["fid_ratio"] = entry["fid"] / statistics.fmean(refs) if ok else None
    return sorted(out, key=_order)


def _order(e: dict[str, Any]) -> tuple:
    interval = (-1.0, -1.0) if e["interval"] is None else tuple(e["interval"])
    return (e["scale"], interval, not e["reference"], e["nfe"], e["fid"])


def interval_text(interval) -> str:
    return "always" if interval is None else f"σ ∈ [{interval[0]:g}, {interval[1]:g}]"


def _value(entry: dict[str, Any], metric: str) -> str:
    mean, std = entry.get(metric), entry.get(f"{metric}_std")
    if mean is None:
        return "–"
    fmt = {"accuracy": "{:.1%}", "fid": "{:.2f}", "seconds": "{:.0f}"}.get(metric, "{:.3f}")
    text = fmt.format(mean)
    if std is not None:
        text += " ± " + fmt.format(std).rstrip("%") + ("%" if metric == "accuracy" else "")
    return text


def table(rows: list[dict[str, Any]]) -> str:
    """sweep.md's table: one line per cell, by scale, interval, then NFE and FID."""
    summary = summarize(rows)
    metrics = [m for m in METRICS if summary and m in summary[0]]
    names = {"accuracy": "judge accuracy", "fid": "FID"}
    head = ["solver", "grid", "steps", "NFE", "scale", "guidance", "η", "seeds",
            *(names.get(m, m) for m in metrics), "FID / ref", "s / seed"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for e in summary:
        solver = f"**{e['solver']}** (ref.)" if e["reference"] else e["solver"]
        ratio = "–" if e["fid_ratio"] is None else f"{e['fid_ratio']:.2f}"
        eta = "–" if e["eta"] is None else f"{e['eta']:g}"
        cols = [solver, e["grid"], str(e["steps"]), str(e["nfe"]), f"{e['scale']:g}",
                interval_text(e["interval"]), eta, ",".join(map(str, e["seeds"])),
                *(_value(e, m) for m in metrics), ratio, _value(e, "seconds")]  # fmt: skip
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def best(rows: list[dict[str, Any]], max_nfe: int) -> list[dict[str, Any]]:
    """Per scale and interval: the non-reference cell with the lowest mean FID at <= max_nfe."""
    found: dict[tuple, dict[str, Any]] = {}
    for e in summarize(rows):
        if e["reference"] or e["nfe"] > max_nfe:
            continue
        key = (e["scale"], None if e["interval"] is None else tuple(e["interval"]))
        if key not in found or e["fid"] < found[key]["fid"]:
            found[key] = e
    return list(found.values())


def best_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for budget in BUDGETS:
        for e in best(rows, budget):
            ratio = "" if e["fid_ratio"] is None else f", {e['fid_ratio']:.2f}× the reference's"
            lines.append(
                f"- ≤ {budget} NFE, scale {e['scale']:g}, guidance {interval_text(e['interval'])}: "
                f"{e['solver']} on {e['grid']} with {e['steps']} steps (NFE {e['nfe']}): "
                f"FID {e['fid']:.2f}{ratio}"
            )
    return lines


def write_markdown(out_dir: Path, setup: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    n = setup.get("per_class", 0) * len(setup.get("classes", []))
    if setup.get("metric") == "judge":
        how = (
            f"Bundled Fashion-MNIST models; {n} samples per cell and seed ({setup['per_class']} "
            f"per class), scored by the judge classifier (its accuracy on the requested class; "
            f"FID, precision and recall in its features against {setup['reference_size']} test "
            f"images; the judge's own test accuracy {setup['judge_test_accuracy']:.1%})."
        )
    else:
        how = f"{n} samples per cell and seed."
    best_text = "\n".join(best_lines(rows)) or "- (no cell within 10 or 20 NFE yet)"
    text = f"""# adm sweep

{how} NFE = network calls per sample; classifier guidance adds one classifier forward and
backward per NFE. "FID / ref" divides by the reference cell's FID at the same scale over the same
seeds (paired: the same noise). With several seeds: mean ± sample standard deviation.

{table(rows)}

Lowest FID within a budget of network calls:

{best_text}

![FID against NFE](sweep.png)
"""
    path = out_dir / "sweep.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def plot(path: Path, rows: list[dict[str, Any]], metric_name: str | None = None) -> bool:
    """FID (log axis) against NFE: one line per solver (colour) and grid (line style), one panel
    per scale and interval, the reference as a grey dashed line. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return False
    summary = summarize(rows)
    sweep = [e for e in summary if not e["reference"]]
    panels = list(dict.fromkeys((e["scale"], _hashable(e["interval"])) for e in sweep))
    panels = panels or [(e["scale"], None) for e in summary[:1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (scale, interval) in zip(axes[0], panels, strict=True):
        for e in summary:
            if e["reference"] and e["scale"] == scale:
                label = f"{e['solver']}-{e['steps']} (reference)"
                ax.axhline(e["fid"], color="grey", linestyle="--", linewidth=1, label=label)
        panel = [e for e in sweep if e["scale"] == scale and _hashable(e["interval"]) == interval]
        _lines(ax, panel, rows)
        ax.set_yscale("log")  # a failed cell (FID 10x the others) must not flatten the rest
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel("NFE (network calls per sample)")
        ax.set_ylabel("FID" if metric_name is None else f"FID ({metric_name})")
        ax.set_title(f"scale {scale:g}, guidance {interval_text(interval)}")
        ax.grid(alpha=0.3, which="major")
    legend: dict[str, Any] = {}  # every panel's lines, once each (panels hold different ones)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    axes[0][-1].legend(legend.values(), legend.keys(), fontsize=7, loc="upper left",
                       bbox_to_anchor=(1.02, 1.0), handlelength=4)  # fmt: skip
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return True


def _lines(ax, panel: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """One line per solver and grid of `panel`; colours and styles fixed by the run order."""
    solvers = list(dict.fromkeys(r["solver"] for r in rows if not r["reference"]))
    grids = list(dict.fromkeys(r["grid"] for r in rows if not r["reference"]))
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    for solver in solvers:
        for grid in grids:
            cells = sorted((e for e in panel if e["solver"] == solver and e["grid"] == grid),
                           key=lambda e: e["nfe"])  # fmt: skip
            if not cells:
                continue
            x, y = [e["nfe"] for e in cells], [e["fid"] for e in cells]
            color = f"C{solvers.index(solver) % 10}"
            label = f"{solver} / {grid}" if len(grids) > 1 else solver
            ax.plot(x, y, marker="o", markersize=4, color=color, label=label,
                    linestyle=styles[grids.index(grid) % len(styles)])  # fmt: skip
            if any(e["fid_std"] for e in cells):
                yerr = [e["fid_std"] or 0 for e in cells]
                ax.errorbar(x, y, yerr=yerr, color=color, linestyle="none", capsize=2)


def _hashable(interval) -> tuple[float, float] | None:
    return None if interval is None else (float(interval[0]), float(interval[1]))
