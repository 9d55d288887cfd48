"""benchmarks/bench_train.py: the datasheet peak that MFU is measured against, by GPU name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_train


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989.4),
        ("NVIDIA H100 80GB HBM3", 989.4),  # SXM
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla V100-SXM2-32GB", 125.0),
        ("NVIDIA GeForce RTX 4090", None),  # not in the table: MFU is reported as n/a
    ],
)
def test_gpu_peak_comes_from_the_datasheet_of_that_card(monkeypatch, name, peak) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    value, source = bench_train._peak_tflops(torch.device("cuda"), None)
    assert value == peak
    assert ("datasheet" in source) if peak else (source == f"unknown GPU {name}")


def test_a_given_peak_wins_over_the_table() -> None:
    assert bench_train._peak_tflops(torch.device("cuda"), 500.0) == (500.0, "given")
