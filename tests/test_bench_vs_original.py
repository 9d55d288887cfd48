"""benchmarks/bench_vs_original.py: its argument errors, its ratio statistics, its weight copy and,
when the original code is present ($ADM_ORIGINAL), its comparison run on tiny networks."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_vs_original as bench
import original_code
import saved_activations
import timing

ORIGINAL = os.environ.get(original_code.ENV_VAR)
needs_original = pytest.mark.skipif(
    not ORIGINAL or not (Path(ORIGINAL) / "guided_diffusion" / "unet.py").is_file(),
    reason=f"the original code is not present: set {original_code.ENV_VAR}=PATH to a clone of "
    f"{original_code.URL} (commit {original_code.COMMIT})",
)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_missing_original_says_where_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(original_code.ENV_VAR, raising=False)
    assert bench.main(["--original", str(tmp_path), "--quick"]) == 2
    err = _one_line_error(capsys)
    assert str(tmp_path) in err and original_code.URL in err and original_code.COMMIT in err
    assert bench.main(["--quick"]) == 2
    assert original_code.ENV_VAR in _one_line_error(capsys)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--measure", "fwd:33m"], "KIND:NETWORK:BATCH"),
        (["--measure", "fwd:33m:0"], "KIND:NETWORK:BATCH"),
        (["--measure", "sideways:33m:1"], "kind must be one of"),
        (["--measure", "fwd:99m:1"], "network must be one of"),
        (["--measure", "guided:128x128_classifier:1"], "no classifier to guide it"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--processes", "0"], "--processes must be at least 1"),
        (["--steps", "ddim0"], "--steps 'ddim0'"),
        (["--device", "tpu"], "--device 'tpu'"),
    ],
)
def test_bad_values_are_one_line_errors_before_any_work(args, words, capsys, tmp_path):
    # the original's path is checked after the values, so a bad value is named first
    assert bench.main(["--original", str(tmp_path), *args]) == 2
    assert words in _one_line_error(capsys)


def test_unknown_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--bogus"])
    assert exit_.value.code == 2
    assert "--bogus" in _one_line_error(capsys)


def test_ratio_statistics_leave_out_disturbed_pairs():
    adm = timing.Timings([1.0, 1.0, 1.0, 3.0], cpu=[1.0, 1.0, 1.0, 1.0])  # the last pair disturbed
    original = timing.Timings([1.2, 1.4, 1.3, 1.2], cpu=[1.0, 1.5, 2.0, 2.5])
    s = bench.summarise({"adm": adm, "original": original})
    assert s["disturbed"] == 1 and s["pairs"] == 4 and s["cpu_ratio"] == pytest.approx(1.75)
    assert s["ratio"] == pytest.approx(1.3) and s["ratio_all_pairs"] == pytest.approx(1.25)
    assert (s["ratio_min"], s["ratio_max"]) == pytest.approx((1.2, 1.4))
    assert s["ratio_iqr"] == pytest.approx([1.25, 1.35])


def test_every_benchmark_network_is_expressible_in_the_original():
    for name, network in bench.NETWORKS.items():
        cls, kwargs = original_code.constructor_kwargs(network().config)
        assert (cls == "EncoderUNetModel") == ("classifier" in name)
        assert kwargs["use_fp16"] is False


def test_weight_copy_reports_key_differences():
    problems = original_code.copy_weights(nn.Linear(2, 2), nn.Linear(2, 2, bias=False))
    assert problems == ["only in the original: bias"]
    source, target = nn.Linear(2, 2), nn.Linear(2, 2)
    assert original_code.copy_weights(source, target) == []
    assert torch.equal(source.weight, target.weight)


def test_process_children_get_the_timed_measurements_and_their_own_json():
    argv = ["--original", "/x", "--measure", "fwd:33m:4", "mem:33m:4", "--processes", "3"]
    argv += ["--json", "out.json", "--threads", "2", "--processes=3", "--json=o.json"]
    timed = [bench.Measure.parse("fwd:33m:4")]
    child = bench.child_argv(argv, timed, "/tmp/c.json")
    assert child == [
        "--original",
        "/x",
        "--threads",
        "2",
        "--measure",
        "fwd:33m:4",
        "--processes",
        "1",
        "--json",
        "/tmp/c.json",
    ]


@needs_original
def test_training_step_is_timed_in_the_layout_adm_train_uses():
    # `adm train` keeps NCHW on the CPU (prepare_model with trainable=True); the sampling
    # measurements use the inference layout (channels_last on the CPU)
    script_util = original_code.import_original(original_code.find_original(ORIGINAL))
    pairs = bench.Pairs(script_util, torch.device("cpu"), bench.AdmOptions())
    ours, _ = pairs.get("tiny", trainable=True)
    config = bench.NETWORKS["tiny"]().config
    trained = bench.prepare_model(bench.build_model(config), device="cpu", trainable=True)
    layout = bench.adm_unet.input_memory_format
    assert layout(ours) == layout(trained) and next(ours.parameters()).requires_grad
    inference, _ = pairs.get("tiny")
    sampled = bench.prepare_model(bench.build_model(config), device="cpu")
    assert inference is not ours and layout(inference) == layout(sampled)
    assert layout(sampled) != layout(trained)  # else this test checks nothing on this machine


@needs_original
def test_processes_report_the_spread_across_fresh_processes(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--original", ORIGINAL, "--threads", "1", "--measure", "fwd:tiny_classifier:1"]
    argv += ["--repeats", "1", "--warmup", "0", "--processes", "2", "--json", str(out)]
    assert bench.main(argv) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["processes"] == 2 and len(result["ratios"]) == 2 and len(result["runs"]) == 2
    assert result["ratio_min"] <= result["ratio"] <= result["ratio_max"]


@needs_original
def test_comparison_against_the_original_on_tiny_networks(tmp_path):
    out = tmp_path / "bench.json"
    argv = [
        "--original",
        ORIGINAL,
        "--threads",
        "1",
        "--measure",
        "fwd:tiny_classifier:1",
        "guided:tiny:1",
        "fwdbwd:tiny:1",
    ]
    argv += ["--repeats", "1", "--repeats-guided", "1", "--warmup", "0", "--steps", "ddim2"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    raw = json.loads(out.read_text())
    assert set(raw["agreement"]) == {"tiny", "tiny_classifier"}
    assert all(v <= bench.TOLERANCE for v in raw["agreement"].values())
    fwd, guided, fwdbwd = raw["results"]
    assert fwd["pairs"] == guided["pairs"] == 1 and fwd["ratio"] > 0 and guided["ratio"] > 0
    worst, name = raw["gradient_agreement"]["tiny"]  # the fused norm + SiLU's backward
    assert worst <= bench.GRAD_TOLERANCE and fwdbwd["ratio"] > 0, name
    assert guided["sample_max_abs_diff"] < 1e-3
    assert raw["env"]["before"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


@needs_original
def test_a_weight_that_differs_fails_the_agreement_check():
    script_util = original_code.import_original(original_code.find_original(ORIGINAL))
    config = bench.NETWORKS["tiny_classifier"]().config
    ours, original = bench.build_pair(script_util, config, torch.device("cpu"), bench.AdmOptions())
    assert bench.check_agreement(ours, original, config) <= bench.TOLERANCE
    assert bench.check_gradients(ours, original, config)[0] <= bench.GRAD_TOLERANCE
    with torch.no_grad():
        next(original.parameters()).mul_(1.01)
    with pytest.raises(SystemExit, match="outputs differ"):
        bench.check_agreement(ours, original, config)
    with pytest.raises(SystemExit, match="gradients differ"):
        bench.check_gradients(ours, original, config)


@pytest.mark.slow
@needs_original
def test_quick_run_with_memory_subprocesses(tmp_path):
    out = tmp_path / "quick.json"
    assert bench.main(["--original", ORIGINAL, "--quick", "--json", str(out)]) == 0
    memory = json.loads(out.read_text())["results"][-1]["memory"]
    assert memory["adm"]["step_mb"] > 0 and memory["original"]["step_mb"] > 0


def test_gpu_check_budget_interrupts_and_restores_the_outer_limit():
    import gpu_check

    budget = gpu_check.Budget(60)
    with budget.limit(30):
        with pytest.raises(TimeoutError, match="time budget"), budget.limit(0.2):
            time.sleep(5)  # interrupted by the alarm after 0.2 s
        outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20 < outer_left <= 30  # the enclosing limit goes on
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    with pytest.raises(TimeoutError, match="skipped"), gpu_check.Budget(0.05).limit(10):
        pass


def test_gpu_check_writes_before_the_marker(tmp_path):
    import gpu_check

    results = tmp_path / "RESULTS.md"
    results.write_text(f"# R\n\n## issue 17\n\n{gpu_check.MARKER}\n\n## older\n")
    gpu_check.write(results, "### run 1\n")
    gpu_check.write(results, "### run 2\n")
    text = results.read_text()
    assert text.index("### run 1") < text.index("### run 2") < text.index(gpu_check.MARKER)
    assert text.index(gpu_check.MARKER) < text.index("## older")


@pytest.mark.slow
def test_gpu_check_dry_run_completes(tmp_path):
    import gpu_check

    out = tmp_path / "dry.md"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--budget", "300"]) == 0
    text = out.read_text()
    assert "FAILED" not in text and "failed:" not in text
    for title in ("golden networks", "sampling throughput", "forward MFU", "training throughput"):
        assert title in text


def test_gpu_check_runs_only_the_sections_asked_for(tmp_path, capsys):
    """`--only 1,6` (the golden agreement and the primitives: seconds on the CPU) writes just
    those, numbered as in a full run; a bad list stops before any work, naming what it wants."""
    import gpu_check

    out = tmp_path / "dry.md"
    assert gpu_check.main(["--dry-run", "--only", "1,6", "--out", str(out)]) == 0
    text = out.read_text()
    assert "**1. fp32 / bf16 / fp16 agreement" in text and "**6. primitives" in text
    assert "**2." not in text and "FAILED" not in text and "--only 1,6" in text
    for bad in ("8", "0,1", "x", ""):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            gpu_check.main(["--dry-run", "--only", bad, "--out", str(tmp_path / "bad.md")])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("gpu_check.py: error: --only: expected section numbers 1-7 joined")
        assert err.count("\n") == 1  # one line, not argparse's usage block
    assert not (tmp_path / "bad.md").exists()


def test_saved_activations_counts_what_attention_checkpointing_drops():
    """The saved-tensor count is exact: recomputing attention in backward drops what the
    attention blocks keep, and nothing else; weights are never counted."""
    from adm.nets.unet import set_attention_checkpointing

    config = bench.NETWORKS["tiny"]().config
    net = bench.build_model(config).train()
    x, t, kwargs = bench.inputs(config, 2, torch.device("cpu"))
    full, by_shape = saved_activations.saved_for_backward(net, x, t, kwargs)
    assert full == sum(by_shape.values()) > 0
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    assert full < 40 * weights  # sanity: a tiny net at 32x32, batch 2
    lean, _ = saved_activations.saved_for_backward(set_attention_checkpointing(net), x, t, kwargs)
    assert 0 < lean < full, (lean, full)
    assert saved_activations.main(["--original", "/nonexistent-adm-original"]) == 2
