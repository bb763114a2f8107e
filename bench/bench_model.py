"""Benchmark: FMM-TC inference latency and throughput, demo model vs a BrainLM-111M-sized one.

Run: ``python bench/bench_model.py [--repeat 5] [--batch 8]``

For each configuration, measured in this one run on random inputs of the right shape
(426 HCPEx regions, 200-sample window):

- latency: one subject, window already prepared, full ensemble forward (every fold model)
  with calibration, median of ``--repeat`` runs after a warm-up;
- throughput: subjects per second for batches of ``--batch`` subjects.

Configurations: the bundled demo model (``assets/models/demo``: tiny encoder + 5 BrainNetCNN
folds) and the same ensemble with a ``base`` (110.8 M parameter, BrainLM-111M-sized) encoder
with random weights - the speed does not depend on the weight values. Target (issue "model"):
demo inference under 1 s per subject on this 2-core CPU. A GPU is used when present.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "models" / "demo"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    from fmmtc_core.models.fmmtc import FMMTC, FMMTCConfig
    from fmmtc_core.models.foundation import BrainLMConfig, BrainLMModel
    from fmmtc_core.models.ensemble import load_model

    demo = load_model(args.model)
    rows = []
    rng = np.random.default_rng(0)
    r, t = int(demo.xyz.shape[0]), demo.window

    def measure(name, ens):
        one_w = rng.standard_normal((1, r, t)).astype(np.float32)
        one_f = np.tanh(rng.standard_normal((1, r, r))).astype(np.float32)
        many_w = rng.standard_normal((args.batch, r, t)).astype(np.float32)
        many_f = np.tanh(rng.standard_normal((args.batch, r, r))).astype(np.float32)
        one_a = rng.standard_normal((1, r)).astype(np.float32) if ens.uses_amplitude else None
        many_a = (rng.standard_normal((args.batch, r)).astype(np.float32)
                  if ens.uses_amplitude else None)
        lat = _time(lambda: ens.predict_proba(one_w, one_f, one_a), args.repeat)
        per_batch = _time(lambda: ens.predict_proba(many_w, many_f, many_a),
                          max(2, args.repeat // 2))
        n_params = sum(p.numel() for m in ens.models[:1] for p in m.parameters())
        rows.append((name, len(ens.models), n_params, lat, args.batch / per_batch))

    measure("demo (tiny encoder)", demo)
    # Same ensemble, BrainLM-111M-sized encoder (random weights; speed only).
    base_cfg = BrainLMConfig.base(num_brain_voxels=r, num_timepoints_per_voxel=t)
    encoder = BrainLMModel(base_cfg).eval().to(demo.device)
    cfg = FMMTCConfig(**(demo.card["model"] | {"foundation_config": base_cfg.to_dict()}))
    big_models = [FMMTC(cfg, encoder).to(demo.device).eval() for _ in demo.models]
    big = type(demo)(big_models, demo.card, demo.xyz, demo.cohort_mean_fc, demo.device,
                     atlas=demo.atlas, window=t)
    measure("BrainLM-111M-sized encoder", big)

    print(f"FMM-TC inference, {r} regions x {t} samples, device {demo.device}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    print()
    print("| model | folds | parameters (one fold model) | latency, 1 subject (s) | "
          f"throughput, batch {args.batch} (subjects/s) |")
    print("| --- | --- | --- | --- | --- |")
    for name, k, n, lat, thr in rows:
        print(f"| {name} | {k} | {n / 1e6:.2f} M | {lat:.3f} | {thr:.1f} |")
    print()
    print(f"latency ratio 111M-sized / demo: {rows[1][3] / rows[0][3]:.1f}x")


if __name__ == "__main__":
    main()
