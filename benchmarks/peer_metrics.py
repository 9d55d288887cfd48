"""KID and IS (mean, std) of adm against torch-fidelity's own functions on identical features.

torch-fidelity's package imports torchvision, which does not import beside this CPU torch, so
this loads only its two metric modules from an unpacked source tree, with the helpers they
import stubbed by the two trivial functions they use (`get_kwarg`, `vassert`, `vprint`):

    pip download torch-fidelity==0.4.0 --no-deps -d /tmp/tf
    python -m zipfile -e /tmp/tf/torch_fidelity-0.4.0-py3-none-any.whl /tmp/tf/src
    python benchmarks/peer_metrics.py /tmp/tf/src

Features are random (pool_3-like, non-negative, 2048-d; logits 1008-d); torch-fidelity's IS is
called with shuffle=False and splits = N / 5000 so that its splits are the original's. KID with
torch-fidelity's defaults (100 subsets of 1000, cubic polynomial kernel, seed 2020).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

from adm.evaluation import metrics


def _load(src: Path, name: str):
    helpers = types.ModuleType("torch_fidelity.helpers")
    helpers.get_kwarg = lambda key, kwargs: kwargs[key]

    def vassert(ok, message):
        if not ok:
            raise ValueError(message)

    helpers.vassert, helpers.vprint = vassert, lambda verbose, message: None
    utils = types.ModuleType("torch_fidelity.utils")
    for f in ("create_feature_extractor", "extract_featuresdict_from_input_id_cached",
              "resolve_feature_extractor", "resolve_feature_layer_for_metric",
              "get_cacheable_input_name"):  # fmt: skip
        setattr(utils, f, None)  # imported, not used by the *_features_to_metric functions
    package = types.ModuleType("torch_fidelity")
    stubs = {"torch_fidelity.helpers": helpers, "torch_fidelity.utils": utils}
    sys.modules.update({"torch_fidelity": package, **stubs})
    spec = importlib.util.spec_from_file_location(name, src / "torch_fidelity" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "src", type=Path, help="unpacked torch-fidelity source (holds torch_fidelity/)"
    )
    parser.add_argument("--n", type=int, default=3000, help="features per side")
    args = parser.parse_args()
    kid_mod, isc_mod = _load(args.src, "metric_kid"), _load(args.src, "metric_isc")
    rng = np.random.default_rng(0)
    sample = np.abs(rng.standard_normal((args.n, 2048))).astype(np.float32) * 0.4
    ref = np.abs(rng.standard_normal((args.n + 500, 2048))).astype(np.float32) * 0.45
    theirs = kid_mod.kid_features_to_metric(
        torch.from_numpy(sample), torch.from_numpy(ref), kid_subsets=100, kid_subset_size=1000,
        kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1, rng_seed=2020, verbose=False,  # torch-fidelity's defaults
    )  # fmt: skip
    ours = metrics.kernel_distance(sample, ref)
    for key, mine in (("mean", ours.mean), ("std", ours.std)):
        other = theirs[f"kernel_inception_distance_{key}"]
        rel = abs(mine - other) / abs(other)
        print(f"KID {key}: adm {mine:.10g}  torch-fidelity {other:.10g}  "
              f"difference {mine - other:.2g} ({rel:.2g} relative)")  # fmt: skip
    logits = rng.standard_normal((10000, 1008)).astype(np.float32) * 3
    theirs = isc_mod.isc_features_to_metric(torch.from_numpy(logits), splits=2, shuffle=False)
    for key, mine in (("mean", metrics.inception_score(logits, 5000)),
                      ("std", metrics.inception_score_std(logits, 5000))):  # fmt: skip
        other = theirs[f"inception_score_{key}"]
        print(f"IS {key} (2 splits of 5000): adm {mine:.12g}  torch-fidelity {other:.12g}  "
              f"relative difference {abs(mine - other) / abs(other):.2g}")  # fmt: skip


if __name__ == "__main__":
    main()
