"""benchmarks/bench_primitives.py: a smoke run on tiny shapes, its agreement check, its errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_primitives as bench


def test_quick_run_reports_every_case_and_alternative(tmp_path, capsys):
    out = tmp_path / "primitives.json"
    assert bench.main(["--quick", "--repeats", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    names = {"norm_silu_adagn", "norm_silu", "upsample", "qkv", "norm_qkv", "skip"}
    assert set(report["cases"]) == names
    for case in bench.cases(quick=True):
        row = report["cases"][case.name]
        assert row["agreement"] <= 1e-4 and row["adm_ms"] > 0
        for other in case.others:
            r = row[other]
            assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and r["pairs"] == 2
            assert f"{other}/adm" in printed


def test_a_primitive_that_disagrees_is_refused_before_timing():
    case = bench.cases(quick=True)[2]  # upsample
    assert case.name == "upsample"
    case.ours = lambda t: bench.upsample_nearest2x(t[0]) * 1.001
    with pytest.raises(ValueError, match="upsample: adm and interpolate differ in the output"):
        bench.check(case)
    case.ours = lambda t: bench.upsample_nearest2x(t[0] * 1.0) + 0 * t[0].sum()
    bench.check(case)  # the same values and gradients: accepted
    case = bench.cases(quick=True)[0]  # AdaGN with the shift's gradient cut off: values agree
    original = case.others["original"]
    case.ours = lambda t: original([t[0], t[1], t[2].detach()]) + 0 * t[2]
    with pytest.raises(ValueError, match=r"norm_silu_adagn: .* differ in gradient 2 "):
        bench.check(case)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["--threads", "0"], "--threads must be at least 1, got 0"),
        (["--device", "tpu"], "--device must be cpu or cuda, got 'tpu'"),
    ],
)
def test_bad_values_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--quick", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_cuda_without_a_device_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--quick", "--device", "cuda"])
    assert exit_.value.code == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
