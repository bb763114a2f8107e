"""Diagnostic: where the completeness gap of an explanation stops falling, and why.

Run: ``python bench/explain_floor.py [--model DIR] [--subject 3]``

On one simulated participant of ``bench/bench_explain.py`` (same seed rule: ``1000 + subject``,
a non-responder when ``subject % 4 == 3``), with the model's shared-encoder forward ``F``:

1. **Batch coupling**: ``F`` at path point alpha = 0.3 evaluated alone, next to alpha = 0.9 and
   next to alpha = 0 in one batch. A model whose output depends on its batch-mates integrates a
   slightly different function at every batch of path points, which puts a floor under the gap
   of any rule that evaluates several points per batch (``fmmtc_core.explain`` does).
2. **The rules themselves, one point per batch**: the completeness gap of nested Clenshaw-Curtis
   (2 -> 64 intervals, end nodes included) and of Fejer's second rule (the same nodes without
   the two ends), every gradient computed on its own and the weighted sums in float64, so
   neither batching nor our summation can add to the gap.

Measured on 2026-11-26 (README, "Benchmarks / Explanations") on the demo model, subject 3.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def fejer2(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Fejer's second rule on [0, 1] with ``n`` intervals: the n - 1 interior Clenshaw-Curtis
    nodes (nested under doubling like them) and their weights."""
    theta = np.arange(1, n) * np.pi / n
    w = np.zeros(n - 1)
    for j in range(1, n // 2 + 1):
        w += np.sin((2 * j - 1) * theta) / (2 * j - 1)
    w *= 4.0 / n * np.sin(theta)
    return (1 - np.cos(theta)) / 2, w / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "models" / "demo"))
    parser.add_argument("--subject", type=int, default=3)
    args = parser.parse_args()

    import torch
    from bench_explain import _inputs

    from fmmtc_core.explain import _ensemble_logit_fn, clenshaw_curtis
    from fmmtc_core.models.ensemble import load_model

    torch.set_num_threads(2)
    ens = load_model(args.model)
    if not ens.uses_amplitude:
        raise SystemExit("this diagnostic is written for models that read the amplitude "
                         "(the demo model)")
    w, fc, amp = _inputs(1000 + args.subject, args.subject % 4 != 3, ens)
    x = (torch.from_numpy(w)[None], torch.from_numpy(fc)[None], torch.from_numpy(amp)[None])
    b = (torch.zeros_like(x[0]), ens.cohort_mean_fc[None],
         torch.stack([m.amplitude_readout.center for m in ens.models]).mean(0)[None])
    f = _ensemble_logit_fn(ens, True, True, None, True)

    def points(alphas):
        a = torch.tensor(alphas, dtype=x[0].dtype)
        return [bb + a.view((-1,) + (1,) * (xx.dim() - 1)) * (xx - bb) for xx, bb in zip(x, b)]

    with torch.no_grad():
        d_f = float(f(*x) - f(*b))
        alone = float(f(*points([0.3]))[0])
        with_far = float(f(*points([0.3, 0.9]))[0])
        with_base = float(f(*points([0.3, 0.0]))[0])
    print(f"model {ens.name}, subject {args.subject}: F(x) - F(baseline) = {d_f:+.6f}")
    print("\n1. batch coupling: F at alpha 0.3")
    print(f"   alone                {alone:+.8f}")
    print(f"   batched with 0.9     {with_far:+.8f}   (differs by "
          f"{abs(with_far - alone) / abs(d_f):.1e} of |F(x) - F(baseline)|)")
    print(f"   batched with 0.0     {with_base:+.8f}   (differs by "
          f"{abs(with_base - alone) / abs(d_f):.1e})")

    grads: dict[float, list] = {}

    def grad(alpha: float):
        if alpha not in grads:
            pts = [p.requires_grad_(True) for p in points([alpha])]
            g = torch.autograd.grad(f(*pts).sum(), pts)
            grads[alpha] = [t.double() for t in g]
        return grads[alpha]

    def gap(nodes, weights) -> float:
        total = 0.0
        for i in range(len(x)):
            acc = sum(float(wk) * grad(float(a))[i] for a, wk in zip(nodes, weights))
            total += float(((x[i] - b[i]).double() * acc).sum())
        return abs(total - d_f) / abs(d_f)

    print("\n2. completeness gap, one point per batch, float64 sums (relative to |F(x) - F(b)|)")
    print(f"   {'intervals':>9} {'Clenshaw-Curtis':>16} {'grads':>6} {'Fejer 2 (no ends)':>18} "
          f"{'grads':>6}")
    for n in (2, 4, 8, 16, 32, 64):
        cc = gap(*clenshaw_curtis(n))
        fj = gap(*fejer2(n))
        print(f"   {n:>9} {cc:>16.2e} {n + 1:>6} {fj:>18.2e} {n - 1:>6}", flush=True)


if __name__ == "__main__":
    main()
