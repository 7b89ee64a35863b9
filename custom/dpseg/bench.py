"""Benchmarks that print figures: DP vs non-DP training-step time and peak memory.

Every mode is timed in the same process on the same batch (the bundle's network, its loss, batch
of ``batch_size`` 128 x 128 slices), as the median of ``repeats`` full optimizer steps after one
warm-up step. A "step" is forward, backward, (per-sample clipping and noise for DP) and Adam.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time

import torch
from opacus.optimizers import DPOptimizer

from dpseg.bundle import Bundle
from dpseg.dptrain import make_private

DP_MODES = ("fast", "hooks", "functorch", "ew")  # "fast": dpseg.fastdp, the default


def _batch(bundle: Bundle, batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 1, *bundle.roi_size(), generator=g)
    y = (torch.rand(batch_size, 1, *bundle.roi_size(), generator=g) > 0.8).float()
    return x, y


def _step_fn(bundle: Bundle, mode: str, batch_size: int):
    """A step function for one mode: 'plain' (no DP), a dptrain.GRAD_SAMPLE_MODES mode, or Opacus' 'ew'."""
    net, loss_fn = bundle.network(), bundle.loss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = _batch(bundle, batch_size)
    per_sample, model = None, net
    if mode == "ew":
        opt = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size,
                          loss_reduction="mean", generator=torch.Generator().manual_seed(1))
        model = _expanded_weights(net, batch_size)
    elif mode != "plain":
        model, per_sample, opt = make_private(net, opt, mode, 1.0, 1.0, batch_size, torch.Generator().manual_seed(1))

    def step():
        opt.zero_grad(set_to_none=True)
        if per_sample is not None:
            per_sample.backward(x, y, loss_fn)
        else:
            loss_fn(model(x), y).backward()
        opt.step()
    return step


def _expanded_weights(net, batch_size):
    from opacus.grad_sample import get_gsm_class

    return get_gsm_class("ew")(net, batch_first=True, loss_reduction="mean")


def time_mode(bundle: Bundle, mode: str, batch_size: int, repeats: int) -> dict:
    try:
        step = _step_fn(bundle, mode, batch_size)
        step()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    except Exception as err:  # a mode that does not support this network
        return {"mode": mode, "error": f"{type(err).__name__}: {str(err)[:200]}"}
    return {"mode": mode, "median_s": statistics.median(times), "runs": repeats,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def step_time_ratios(batch_size: int = 16, repeats: int = 7, threads: int | None = None) -> dict:
    """Median step time of each DP mode divided by the non-DP step time (same process)."""
    if threads:
        torch.set_num_threads(threads)
    bundle = Bundle()
    plain = time_mode(bundle, "plain", batch_size, repeats)
    results = [plain] + [time_mode(bundle, m, batch_size, repeats) for m in DP_MODES]
    for r in results:
        if "median_s" in r:
            r["ratio_to_non_dp"] = r["median_s"] / plain["median_s"]
    return {"benchmark": "dp_step_time", "batch_size": batch_size, "input": list(bundle.roi_size()),
            "network": "bundle network_def", "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}",
            "torch": torch.__version__, "modes": results,
            "note": "peak_rss_mb is the process peak so far (cumulative over modes run before)"}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="dpseg bench", description=__doc__)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    out = step_time_ratios(args.batch_size, args.repeats, args.threads)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
