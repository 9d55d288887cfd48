"""Evaluation speed: feature extraction (images/s) and the metrics on 2048-d features.

Usage:
    python benchmarks/bench_eval.py                          # CPU (CUDA when present)
    python benchmarks/bench_eval.py --device cuda --batch-size 256 --images 1024 --pr-points 10000
    python benchmarks/bench_eval.py --dinov2                 # also DINOv2 ViT-L/14 at 224

Weights are random (speed does not depend on them). Extraction is timed the way `adm eval` runs
it (`adm.evaluation.features`: uint8 batches in, the network's own preprocessing, TF32 off), in
the default memory format and in channels_last, interleaved. If pytorch-fid is importable, its
`InceptionV3([3])` (pool_3) runs side by side on the same images, batch size and threads; else
the script says why and prints adm's rate only. Each configuration runs --repeats times after one
warm-up; repetitions more than 25% slower than the fastest are flagged (*) as disturbed by other
load (the machine is shared) and left out of the reported mean (benchmarks/timing.py).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import timing
import torch

from adm.evaluation import features, inception, metrics


def _inception(device: torch.device, channels_last: bool) -> inception.InceptionV3:
    model = inception.InceptionV3()
    model.load_converted(inception.random_state_dict(0))
    return model.eval().requires_grad_(False).to(device).use_channels_last(channels_last)


def _pytorch_fid(device: torch.device):
    """pytorch-fid's pool_3 network (its FID Inception, given adm's random weights instead of
    downloading), or the reason it cannot run here. (Not exercised where pytorch-fid does not
    import, as on the machine of benchmarks/RESULTS.md.)"""
    try:
        import pytorch_fid.inception as pytorch_fid
    except Exception as err:  # ImportError, or torchvision failing beside this torch
        return None, f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
    pytorch_fid.load_state_dict_from_url = lambda *a, **k: inception.random_state_dict(0)
    model = pytorch_fid.InceptionV3([3], resize_input=True, normalize_input=True)
    return model.eval().requires_grad_(False).to(device), None


def bench_extraction(args, device: torch.device) -> None:
    runs = max(1, args.images // args.batch_size)
    n = runs * args.batch_size
    models = {"adm": _inception(device, False), "adm channels_last": _inception(device, True)}
    peer, why = _pytorch_fid(device)
    for size in args.sizes:
        images = torch.randint(0, 256, (args.batch_size, size, size, 3), dtype=torch.uint8)

        def adm(model, images=images):
            with features.full_fp32(), torch.inference_mode():
                for _ in range(runs):
                    model(images.to(device))

        def pytorch_fid(images=images):  # its input: float [0, 1] NCHW
            with features.full_fp32(), torch.inference_mode():
                for _ in range(runs):
                    peer(images.to(device).permute(0, 3, 1, 2).float() / 255)

        calls = {name: (lambda m=m: adm(m)) for name, m in models.items()}
        if peer is not None:
            calls["pytorch-fid"] = pytorch_fid
        timed = timing.interleaved(calls, args.repeats)
        for name, t in timed.items():
            print(f"extraction {size}x{size} -> 299, batch {args.batch_size}, {device}, {name}: "
                  f"{n / t.mean:.2f} images/s  (repeats {t.describe()} s)")  # fmt: skip
        if peer is not None:
            print(f"  adm / pytorch-fid: {timed['pytorch-fid'].mean / timed['adm'].mean:.2f}x")
    if peer is None:
        print(f"pytorch-fid: not importable here ({why}); no side-by-side comparison")


def bench_dinov2(args, device: torch.device) -> None:
    from adm.evaluation import dinov2

    with torch.device("meta"):
        model = dinov2.DINOv2()
    model.load_official(dinov2.random_state_dict())
    model = model.eval().requires_grad_(False).to(device)
    images = torch.randint(0, 256, (args.batch_size, 256, 256, 3), dtype=torch.uint8)

    def run():
        with features.full_fp32(), torch.inference_mode():
            model(images.to(device))

    t = timing.repeat(run, args.repeats)
    print(f"DINOv2 ViT-L/14 256x256 -> 224, batch {args.batch_size}, {device}: "
          f"{args.batch_size / t.mean:.2f} images/s  (repeats {t.describe()} s)")  # fmt: skip


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
    parser.add_argument("--device", default=str(features.default_device()))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=32, help="images per timed run")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--stats-points", type=int, nargs="+", default=[10000])
    parser.add_argument("--pr-points", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dinov2", action="store_true", help="also time DINOv2 ViT-L/14")
    parser.add_argument("--no-metrics", action="store_true", help="extraction only")
    args = parser.parse_args()
    device = torch.device(args.device)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")  # fmt: skip
    bench_extraction(args, device)
    if args.dinov2:
        bench_dinov2(args, device)
    if not args.no_metrics:
        bench_metrics(args, device)


if __name__ == "__main__":
    main()
