"""Activation memory kept for backward: adm against the original code, exactly.

Peak RSS (bench_vs_original.py's `mem:` measurements) also counts kernel workspaces and the
allocator's growth on the first step; this counts only what autograd saves for backward in one
training forward: every distinct storage handed to a saved-tensor hook, weights excluded. It runs
in seconds, is exact and does not depend on the machine's load.

    python benchmarks/saved_activations.py --original /path/to/guided-diffusion [--network 33m]
        [--batch 4]
"""

from __future__ import annotations

import argparse
import collections
import sys

# isort: off
import adm  # noqa: F401 - first: it sets OMP_WAIT_POLICY before torch loads OpenMP
import torch
# isort: on

import bench_vs_original as bench
import original_code

from adm.nets.unet import set_attention_checkpointing


def saved_for_backward(net: torch.nn.Module, x, t, kwargs) -> tuple[int, collections.Counter]:
    """Bytes of the distinct non-weight storages autograd saves in one forward of `net`, in
    total and by (shape, dtype)."""
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}
    by_shape: collections.Counter = collections.Counter()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in weights and key not in seen:
            seen[key] = storage.nbytes()
            by_shape[(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))] += seen[key]
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(x, t, **kwargs)
    return sum(seen.values()), by_shape


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--original", help="the original's folder (or $ADM_ORIGINAL)")
    p.add_argument("--network", default="33m", choices=sorted(bench.NETWORKS))
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    try:
        script_util = original_code.import_original(original_code.find_original(args.original))
    except original_code.OriginalMissing as err:
        print(f"saved_activations.py: error: {err}", file=sys.stderr)
        return 2
    config = bench.NETWORKS[args.network]().config
    torch.manual_seed(0)
    original = original_code.build_original(script_util, config).train()
    ours = bench.build_model(config).train()
    original_code.copy_weights(original, ours)
    x, t, kwargs = bench.inputs(config, args.batch, torch.device("cpu"))
    rows = [("original", *saved_for_backward(original, x, t, kwargs)),
            ("adm", *saved_for_backward(ours, x, t, kwargs))]  # fmt: skip
    set_attention_checkpointing(ours)
    rows.append(("adm, --checkpoint-attention", *saved_for_backward(ours, x, t, kwargs)))
    reference = rows[0][1]
    print(f"activations saved for backward, {args.network}, batch {args.batch}, one forward:")
    for name, total, by_shape in rows:
        top = ", ".join(f"{list(s)} {d} {n / 2**20:.1f}" for (s, d), n in by_shape.most_common(3))
        print(f"  {name:<28} {total / 2**20:7.1f} MB ({total / reference:.2f}x)   largest: {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
