"""`adm sweep` on the bundled Fashion-MNIST models, shrunk (10 samples per cell, 200 reference
images): the files and rows it writes, NFE, resuming without resampling, noise shared with the
demo, and bad input (exit 2, one line, nothing created); on a tiny checkpoint with a random-weight
Inception: the paper's metrics per cell."""

from __future__ import annotations

import json

import pytest
import torch

from adm._util.lock import run_folder_lock
from adm.cli import demo, sweep_report, sweep_run, sweep_subjects
from adm.cli import main as cli
from adm.diffusion import registry

TINY = ["--solvers", "dpm++2m,heun", "--grids", "karras", "--steps", "2", "--scales", "4",
        "--per-class", "1", "--seeds", "0", "--reference", "none", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def small_reference():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_subjects, "REFERENCE_SIZE", 200)
        yield


@pytest.fixture(scope="module")
def subject(small_reference):
    settings = sweep_run.SweepSettings(per_class=1)
    return sweep_subjects.bundled_subject(settings, demo.WEIGHTS_DIR, None, torch.device("cpu"))


def test_tiny_sweep_writes_json_markdown_and_plot(tmp_path, small_reference, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", *TINY, "--out", str(out)]) == 0
    assert "| dpm++2m | karras | 2 | 2 | 4 |" in capsys.readouterr().out
    data = json.loads((out / "sweep.json").read_text())
    rows = data["rows"]
    assert [(r["solver"], r["steps"]) for r in rows] == [("dpm++2m", 2), ("heun", 2)]
    for row in rows:
        assert row["nfe"] == registry.nfe(row["solver"], row["steps"])  # counted network calls
        assert row["grid"] == "karras" and row["scale"] == 4 and row["interval"] is None
        assert row["seed"] == 0 and row["seconds"] > 0
        assert 0 <= row["accuracy"] <= 1 and row["fid"] > 0
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    assert [r["nfe"] for r in rows] == [2, 3]  # heun: 2N - 1
    assert data["setup"]["per_class"] == 1 and data["setup"]["reference_size"] == 200
    assert len(data["summary"]) == 2
    assert "| heun | karras | 2 | 3 |" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_solver_options_make_their_own_cells(tmp_path, subject):
    """`unipc:order=3` and `edm:churn=1` are cells of their own, run with those options (the
    same noise as plain `unipc` / `edm`, other images), counted with their sampler's NFE."""
    solvers = ("unipc", "unipc:order=3", "edm", "edm:churn=1")  # order 3 needs 6 steps
    settings = sweep_run.SweepSettings(solvers, ("karras",), (6,), (4.0,), per_class=1,
                                       reference=None)  # fmt: skip
    assert sweep_run.solver_spec("edm:churn=40:s_noise=1.003") == (
        "edm",
        {"churn": 40.0, "s_noise": 1.003},
    )
    assert sweep_run.solver_spec("unipc:order=3") == ("unipc", {"order": 3})
    rows = sweep_run.run_sweep(tmp_path, settings, subject, progress=False)["rows"]
    expected = [("unipc", 6), ("unipc:order=3", 6), ("edm", 11), ("edm:churn=1", 11)]
    assert [(r["solver"], r["nfe"]) for r in rows] == expected
    assert len({r["cell"] for r in rows}) == 4 and len({r["fid"] for r in rows}) == 4
    assert {r["eta"] for r in rows} == {None}
    table = sweep_report.table(rows)
    assert "| unipc:order=3 | karras | 6 | 6 |" in table and "| edm:churn=1 |" in table


def test_rerun_skips_done_cells_and_samples_only_new_ones(tmp_path, subject, monkeypatch):
    settings = sweep_run.SweepSettings(("dpm++2m",), ("karras",), (2,), (4.0,), per_class=1,
                                   reference=None)  # fmt: skip
    first = sweep_run.run_sweep(tmp_path, settings, subject, progress=False)
    assert first["new"] == 1
    sampled = []
    real = sweep_run.sample_cell

    def counting(subject, cell, *args):
        sampled.append(cell)
        return real(subject, cell, *args)

    monkeypatch.setattr(sweep_run, "sample_cell", counting)
    again = sweep_run.run_sweep(tmp_path, settings, subject, progress=False)
    assert again["new"] == 0 and sampled == [] and again["rows"] == first["rows"]
    more = sweep_run.SweepSettings(("dpm++2m",), ("karras",), (2,), (0.0, 4.0),
                                   (None, (0.5, 10.0)), per_class=1, reference=None)  # fmt: skip
    # new: scale 4 with the interval, and scale 0 once (an interval without guidance is no cell)
    sweep_run.run_sweep(tmp_path, more, subject, progress=False)
    assert [(c.scale, c.interval) for c in sampled] == [(0.0, None), (4.0, (0.5, 10.0))]
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    busy = "is in use by another process"
    with run_folder_lock(tmp_path, "adm sweep"), pytest.raises(ValueError, match=busy):
        sweep_run.run_sweep(tmp_path, more, subject, progress=False)  # one process per folder
    assert len(rows) == 3 and len({(r["cell"], r["seed"]) for r in rows}) == 3


def test_cells_share_noise_with_the_demo(subject):
    """A sweep cell draws the demo's noise per sample index: DDIM on the ddim grid with η = 1 gives
    the demo's images exactly, so cells of one seed differ only in solver settings."""
    models, presets = demo.load_models(demo.WEIGHTS_DIR, torch.device("cpu"))
    settings = demo.DemoSettings(per_class=1, steps="ddim3", eta=1.0)
    labels = torch.arange(10)
    want = demo._sample(models, presets, settings, labels, 2.0, "ddim", _NoBar())
    cell = sweep_run.Cell("ddim", "ddim", 3, 2.0, None, 1.0, 0)
    got, nfe = sweep_run.sample_cell(subject, cell, labels, 100)
    assert nfe == 3 and (got[..., 0] == want).all()
    split, _ = sweep_run.sample_cell(subject, cell, labels, 3)  # batch size does not matter
    assert (split == got).all()


class _NoBar:
    def update(self, n):
        pass


def test_summary_averages_seeds_and_relates_fid_to_the_reference():
    base = {"grid": "karras", "steps": 10, "nfe": 10, "scale": 4.0, "interval": None,
            "eta": None, "reference": False, "accuracy": 0.9, "precision": 0.9, "recall": 0.8,
            "seconds": 2.0}  # fmt: skip
    rows = [
        {**base, "cell": "a", "solver": "unipc", "seed": 0, "fid": 20.0},
        {**base, "cell": "a", "solver": "unipc", "seed": 1, "fid": 22.0},
        {**base, "cell": "b", "solver": "heun", "seed": 3, "fid": 30.0},
    ]  # fmt: skip
    ref = {**base, "cell": "r", "solver": "ddpm", "grid": "uniform", "steps": 250, "nfe": 250,
           "reference": True}  # fmt: skip
    rows += [{**ref, "seed": 0, "fid": 16.0}, {**ref, "seed": 1, "fid": 18.0},
             {**ref, "seed": 2, "fid": 100.0}]  # fmt: skip
    summary = sweep_report.summarize(rows)
    assert [e["solver"] for e in summary] == ["ddpm", "unipc", "heun"]
    unipc, heun = summary[1], summary[2]
    assert unipc["seeds"] == [0, 1] and unipc["fid"] == 21.0
    # paired: the reference over the cell's seeds (0, 1), not all of its own (0, 1, 2)
    assert unipc["fid_std"] == pytest.approx(2**0.5) and unipc["fid_ratio"] == 21.0 / 17.0
    assert heun["fid_ratio"] is None  # the reference has no seed 3
    assert "21.00 ± 1.41" in sweep_report.table(rows)
    assert sweep_report.best(rows, 20) == [unipc] and sweep_report.best(rows, 5) == []
    assert "| heun | karras | 10 | 10 | 4 | always | – | 3 |" in sweep_report.table(rows)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--solvers", "euler"], "--solvers: unknown solver 'euler'"),
        (["--solvers", "euler:order=3"], "--solvers: unknown solver 'euler'"),
        (["--solvers", "unipc:churn=3"], "sampler 'unipc' has no option 'churn'"),
        (["--solvers", "unipc:order=4"], "order of sampler 'unipc' must be 2 or 3, got 4"),
        (["--solvers", "edm:churn"], "'churn' is not OPTION=VALUE"),
        (["--solvers", "edm:s_noise=nan"], "s_noise of sampler 'edm' must be > 0, got nan"),
        (["--grids", "cosine"], "--grids: unknown grid 'cosine'"),
        (["--steps", "0"], "--steps must be positive integers"),
        (["--steps", "1001"], "only 1000 timesteps"),
        (["--steps", "ten"], "--steps 'ten': expected integers"),
        (["--solvers", "heun", "--steps", "1"], "heun needs at least 2 steps"),
        (["--solvers", "edm", "--steps", "1,5"], "edm needs at least 2 steps"),
        (["--grids", "ddim", "--steps", "999"], "no integer stride"),
        (["--intervals", "10:0.5"], "needs 0 <= LO <= HI"),
        (["--intervals", "0.5"], "expected LO:HI"),
        (["--scales", "-1"], "finite and >= 0"),
        (["--scales", ""], "comma-separated list"),
        (["--seeds", "-1"], "--seeds must be >= 0"),
        (["--per-class", "0"], "--per-class must be at least 1"),
        (["--eta", "1.5"], "--eta must be between 0 and 1"),
        (["--reference", "ddpm"], "expected SOLVER:STEPS"),
        (["--reference", "ddpm:2000"], "only 1000 timesteps"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--checkpoint", "x.pt"], "--checkpoint needs --ref-batch"),
        (["--checkpoint", "/no/such.pt", "--ref-batch", "r.npz"], "no such file"),
        (["--classifier", "c.pt"], "--classifier goes with --checkpoint"),
        (["--classes", "0,10"], "classes are 0..9"),
        (["--per-class", "1", "--classes", "0,1"], "at least 4 samples"),
        (["--per-class", "201"], "samples per cell (the judge's reference images)"),
        (["--weights", "/nonexistent"], "demo weights"),
        (["--device", "bogus"], "--device bogus"),
    ],
)
def test_bad_values_exit_2_with_one_line_and_create_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert cli.main(["sweep", *argv, "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_sweep_json_of_other_settings_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    setup = sweep_subjects.bundled_setup(sweep_run.SweepSettings(per_class=3), demo.WEIGHTS_DIR)
    sweep_run.write_json(out / "sweep.json", setup, [])
    before = (out / "sweep.json").read_bytes()
    assert cli.main(["sweep", *TINY, "--out", str(out)]) == 2
    assert "other settings (per_class differ)" in capsys.readouterr().err
    (out / "broken").mkdir()
    (out / "broken" / "sweep.json").write_text("{")
    assert cli.main(["sweep", *TINY, "--out", str(out / "broken")]) == 2
    assert "unreadable" in capsys.readouterr().err
    assert (out / "sweep.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["broken", "sweep.json"]


def test_checkpoint_cells_get_the_inception_metrics(tmp_path, capsys, monkeypatch):
    """Any checkpoint + classifier + reference batch: IS, FID, sFID, precision, recall per cell
    (tiny random-weight models and Inception: only the plumbing is checked, and the Fréchet
    distance of 2048-d statistics, tested in test_evaluate, is replaced by a cheap stand-in)."""
    import numpy as np

    from adm.evaluation import evaluate, inception
    from adm.models import checkpoint, presets

    cheap = lambda sample, ref: float(((sample.mu - ref.mu) ** 2).sum())  # noqa: E731
    monkeypatch.setattr(evaluate, "frechet_distance", cheap)

    files = {}
    for name in ("tiny_diffusion", "tiny_classifier"):
        preset = presets.get_preset(name)
        torch.manual_seed(0)
        files[name] = checkpoint.save_model(
            presets.build_model(preset), preset, tmp_path / f"{name}.safetensors"
        )
    weights = tmp_path / "inception.pth"
    torch.save(inception.random_state_dict(seed=1), weights)
    ref = tmp_path / "ref.npz"
    rng = np.random.default_rng(0)
    np.savez(ref, arr_0=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    out = tmp_path / "out"
    argv = ["sweep", "--checkpoint", files["tiny_diffusion"], "--classifier",
            files["tiny_classifier"], "--ref-batch", ref, "--inception-weights", weights,
            "--classes", "1,2", "--per-class", "2", "--solvers", "dpm++2m", "--grids", "karras",
            "--steps", "2", "--scales", "1", "--reference", "none", "--out", out,
            "--no-progress"]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    data = json.loads((out / "sweep.json").read_text())
    assert data["setup"]["metric"] == "inception" and data["setup"]["classes"] == [1, 2]
    assert [(r["scale"], r["nfe"]) for r in data["rows"]] == [(1.0, 2)]
    for row in data["rows"]:
        assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(row)
        assert "accuracy" not in row and np.isfinite(row["fid"])
    assert "| dpm++2m | karras | 2 | 2 | 1 |" in (out / "sweep.md").read_text()
    bad = [a if a != "1,2" else "1,2000" for a in argv]
    assert cli.main([str(a) for a in bad]) == 2
    assert "--classes '1,2000': classes are 0..999" in capsys.readouterr().err


def test_documented_default_grid_and_python_snippet(capsys):
    """docs/sampling.md: the default grid's size and cost as stated, and its Python example runs
    as written."""
    from pathlib import Path

    cells = sweep_run.cells(sweep_run.SweepSettings())
    assert len(cells) == 25 and sum(registry.nfe(c.solver, c.steps) for c in cells) == 666
    assert [c for c in cells if c.reference] == [
        sweep_run.Cell("ddpm", "uniform", 250, 4.0, None, None, 0, reference=True)
    ]
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: dpm++2m,dpm++3m,unipc,ddim,heun,dpm++2m-sde" in help_text
    assert "default: karras,ddim" in help_text and "(default: ddpm:250)" in help_text
    doc = (Path(__file__).resolve().parents[1] / "docs" / "sampling.md").read_text()
    assert "25 cells, 666 network calls per sample" in doc
    code = doc.split("```python\n")[1].split("```")[0]
    exec(compile(code, "docs/sampling.md", "exec"), {})
    assert capsys.readouterr().out.split()[-2:] == ["10", "19"]


def test_the_command_module_loads_without_torch():
    """`adm` builds every parser at start-up: the sweep's modules import torch only when run."""
    import subprocess
    import sys

    code = ("import sys, adm.cli.sweep, adm.cli.sweep_run, adm.cli.sweep_report; "
            "print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
