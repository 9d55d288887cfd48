"""`adm demo` end to end with the bundled weights (a shortened run; the full one is `slow`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from adm.cli import demo
from adm.cli import main as cli
from adm.data import fashion_mnist


@pytest.fixture(scope="module")
def data_dir():
    try:
        return fashion_mnist.find(download=False)
    except fashion_mnist.DataError as err:
        pytest.fail(f"Fashion-MNIST is needed for the demo tests: {err}")


def test_bundled_weights_are_small_and_self_describing():
    files = [demo.WEIGHTS_DIR / f"{name}.safetensors" for name in demo.MODELS]
    assert sum(f.stat().st_size for f in files) <= 10 * 2**20
    from adm.models import checkpoint

    assert [checkpoint.read_preset(f).name for f in files] == list(demo.MODELS)


def test_short_demo_writes_report_grids_plot_and_metrics(tmp_path, data_dir, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--out", str(out), "--per-class", "2", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| ddim | 25 | 8 |" in printed and "dpm++2m" in printed
    result = json.loads((out / "metrics.json").read_text())
    assert [r["scale"] for r in result["scales"]] == [0.0, 1.0, 2.0, 4.0, 8.0]
    for row in [*result["scales"], result["dpm_solver"]]:
        assert set(row) >= {"scale", "accuracy", "precision", "recall", "fid", "grid"}
        assert (out / row["grid"]).exists()
    assert result["judge_test_accuracy"] >= 0.9  # the judge is a real classifier
    # guidance works: the judge agrees with the requested class far more often at scale 8
    assert result["scales"][-1]["accuracy"] > result["scales"][0]["accuracy"] + 0.3
    assert (out / "tradeoff.png").exists() and "| solver |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_full_demo_meets_the_quality_bar(tmp_path, data_dir):
    """The paper's trade-off: accuracy >= 85% at the best scale (~10% unguided), precision up
    and recall down from scale 0 to scale 8."""
    result = demo.run_demo(tmp_path / "demo", progress=False)
    rows = {r["scale"]: r for r in result["scales"]}
    assert max(r["accuracy"] for r in rows.values()) >= 0.85
    assert rows[0.0]["accuracy"] < 0.3
    assert rows[8.0]["precision"] > rows[0.0]["precision"]
    assert rows[8.0]["recall"] < rows[0.0]["recall"]


def test_missing_weights_and_bad_arguments_are_clear(tmp_path, capsys):
    assert cli.main(["demo", "--weights", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "demo weights" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert cli.main(["demo", "--per-class", "1", "--out", str(tmp_path / "o")]) == 2
    capsys.readouterr()
    assert cli.main(["demo", "--eta", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert "--eta must be between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # checked before --retrain would spend hours training
    work = tmp_path / "train"
    assert cli.main(["demo", "--retrain", "--work-dir", str(work), "--eta", "-1"]) == 2
    assert "--eta must be between 0 and 1" in capsys.readouterr().err
    assert not work.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", "/proc/adm/demo"], "cannot create output folder /proc/adm/demo: /proc does not"),
        (["--out", "BLOCKER"], "cannot create output folder BLOCKER: it is a file, not a folder"),
        (["--out", "o", "--retrain", "--work-dir", "BLOCKER/w"], "BLOCKER is a file, not a"),
        (["--out", "o", "--seed", "-2"], "--seed must be at least 0, got -2"),
    ],
)
def test_output_folders_that_cannot_be_made_are_one_sentence(
    tmp_path, capsys, monkeypatch, extra, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BLOCKER").write_text("x")
    assert cli.main(["demo", "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adm demo: error: ") and message in err and err.count("\n") == 1
    assert "Errno" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["BLOCKER"]


def test_cli_help_states_the_demo_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default {demo.DemoSettings.eta:g})" in help_text
    assert f"samples per class and scale (default {demo.DemoSettings.per_class})" in help_text


def test_documented_training_commands_resolve(tmp_path, data_dir, capsys):
    """Every stage of `adm demo --retrain` is a valid adm command (checked with --dry-run), each
    "{run}" standing for a checkpoint of that run's preset, and a stage exports each model."""
    import torch

    from adm.models import checkpoint, presets

    preset_of = {name: args[args.index("--preset") + 1] for name, args, _ in demo.TRAINING}
    saved = {}
    for name in set(preset_of.values()):
        preset = presets.get_preset(name)
        saved[name] = checkpoint.save_model(
            presets.build_model(preset), preset, tmp_path / f"{name}.safetensors"
        )
    for index in range(len(demo.TRAINING)):
        cmd = demo.training_command(
            index, data_dir, tmp_path / "runs", resolve=lambda run: str(saved[preset_of[run.name]])
        )
        assert cmd[0] == "adm"
        torch.manual_seed(0)
        assert cli.main([*cmd[1:], "--dry-run"]) == 0, capsys.readouterr().err
        capsys.readouterr()
    exported = {name: which for name, _, which in demo.TRAINING if which is not None}
    assert sorted(exported) == sorted(demo.MODELS)
    assert all(which == "model" or which.startswith("ema_") for which in exported.values())


def test_retrain_exports_the_chosen_file_of_the_last_step(tmp_path):
    """`--retrain` bundles the raw model or the named EMA of each run's last complete step."""
    run = tmp_path / "run"
    run.mkdir()
    for step in (500, 1000):
        (run / f"state_{step:06d}.pt").write_bytes(b"")
    (run / "state_001500.pt.tmp").write_bytes(b"")  # an unfinished save is not a checkpoint
    assert demo._last_checkpoint(run, "model") == run / "model_001000.safetensors"
    assert demo._last_checkpoint(run, "ema_0.999") == run / "ema_0.999_001000.safetensors"


def test_training_chains_keep_every_stage_after_the_runs_it_reads():
    for jobs in (1, 2):
        chains = demo.training_chains(jobs)
        assert sorted(i for chain in chains for i in chain) == list(range(len(demo.TRAINING)))
        for chain in chains:
            names = [demo.TRAINING[i][0] for i in chain]
            for position, index in enumerate(chain):
                refs = [a[1:-1] for a in demo.TRAINING[index][1] if a.startswith("{")]
                assert all(ref in names[:position] for ref in refs), (names[position], refs)


def test_retrain_runs_every_stage_and_exports_loadable_weights(tmp_path, data_dir, monkeypatch):
    """`adm demo --retrain` end to end with the documented stages cut to two tiny steps each."""
    shrink = {"--steps": "2", "--batch-size": "4", "--save-interval": "2", "--log-interval": "1",
              "--eval-interval": "2", "--eval-size": "8"}  # fmt: skip
    tiny = []
    for name, args, export in demo.TRAINING:
        args = [
            shrink.get(prev, a) if prev in shrink else a
            for prev, a in zip(["", *args], args, strict=False)
        ]
        tiny.append((name, args, export))
    monkeypatch.setattr(demo, "TRAINING", tiny)
    weights = demo.retrain(tmp_path / "train", str(data_dir), progress=False, jobs=2)
    models, _ = demo.load_models(weights, torch.device("cpu"))
    assert sorted(models) == sorted(demo.MODELS)
    assert (tmp_path / "train" / "fmnist_judge.log").is_file()  # the second chain's output
    assert demo._last_checkpoint(tmp_path / "train" / "fmnist_diffusion", "ema_0.999").is_file()


def test_first_line_comes_before_torch_is_imported(tmp_path):
    """The demo says what it does at once: its first line is printed before the seconds of
    importing torch (a blocked torch import shows the order)."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from adm.cli.main import main\n"
        f"main(['demo', '--out', {str(tmp_path / 'o')!r}, '--no-progress'])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr  # torch blocked
    assert result.stdout.startswith("adm demo: classifier guidance on Fashion-MNIST, 100 samples")
