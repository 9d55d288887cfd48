"""Evaluation speed: Inception feature extraction (images/s) and the metrics on 2048-d features.

Usage:
    python benchmarks/bench_eval.py                          # CPU (CUDA when present)
    python benchmarks/bench_eval.py --device cuda --batch-size 256 --images 1024 --pr-points 10000

Weights are random (speed does not depend on them). Each configuration runs --repeats times after
one warm-up; repetitions more than 25% slower than the fastest are flagged (*) as disturbed by
other load (the machine is shared) and left out of the reported mean (benchmarks/timing.py).
"""

from __future__ import annotations

import argparse

import numpy as np
import timing
import torch

from adm.evaluation import evaluate, inception, metrics


def bench_extraction(args, device: torch.device) -> None:
    model = inception.InceptionV3()
    model.load_converted(inception.random_state_dict(0))
    model = model.eval().requires_grad_(False).to(device)
    for size in args.sizes:
        images = torch.randint(0, 256, (args.batch_size, size, size, 3), dtype=torch.uint8)

        def run(images=images):
            with evaluate._full_fp32(), torch.inference_mode():
                for _ in range(max(1, args.images // args.batch_size)):
                    model(images.to(device))

        timed = timing.repeat(run, args.repeats)
        n = max(1, args.images // args.batch_size) * args.batch_size
        print(
            f"extraction {size}x{size} -> 299, batch {args.batch_size}, {device}: "
            f"{n / timed.mean:.2f} images/s  (repeats {timed.describe()} s)"
        )


def bench_metrics(args, device: torch.device) -> None:
    rng = np.random.default_rng(0)
    for n in args.stats_points:
        feats = np.abs(rng.standard_normal((n, 2048))).astype(np.float32) * 0.4
        timed = timing.repeat(lambda feats=feats: metrics.compute_statistics(feats), args.repeats)
        print(
            f"statistics of {n} x 2048 features (float64): {timed.mean:.2f} s  ({timed.describe()})"
        )
    a = metrics.compute_statistics(np.abs(rng.standard_normal((4000, 2048))).astype(np.float32))
    b = metrics.compute_statistics(np.abs(rng.standard_normal((4000, 2048))).astype(np.float32))
    timed = timing.repeat(lambda: metrics.frechet_distance(a, b), args.repeats)
    print(
        "frechet_distance on 2048-d statistics (eigvals of the product): "
        f"{timed.mean:.2f} s  ({timed.describe()})"
    )
    if args.pr_points:
        ref = torch.rand(args.pr_points, 2048) * 0.8
        sample = torch.rand(args.pr_points, 2048) * 0.8
        for mode in ("original", "exact"):
            timed = timing.repeat(
                lambda mode=mode: metrics.precision_recall(ref, sample, mode=mode, device=device),
                max(1, args.repeats - 1),
            )
            print(
                f"precision_recall {args.pr_points} vs {args.pr_points}, {mode}, {device}: "
                f"{timed.mean:.2f} s  ({timed.describe()})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=str(evaluate.default_device()))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=32, help="images per timed run")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--stats-points", type=int, nargs="+", default=[10000])
    parser.add_argument("--pr-points", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}")
    bench_extraction(args, device)
    bench_metrics(args, device)


if __name__ == "__main__":
    main()
