"""Benchmark: one end-to-end ``screen`` vs the sum of its stages run standalone.

Run: ``python bench/bench_screen.py [--repeat 3]``

On the simulated demo scan (97x115x97x300 ``.nii.gz`` on fMRIPrep's 2 mm grid, with its
confounds) and the bundled demo model, measured in this one run after a warm-up:

- **standalone**: each stage called on its own, as the other benchmarks and a user of the
  library would: ``load_scan``, ``parcellate``, ``qc_report``, ``clean``, model inputs +
  ``predict``, ``explain``, and the database write (``add_screening`` in its own transaction);
- **screen()**: the whole pipeline into a fresh SQLite database (``force=True`` so nothing is
  reused), its own per-stage timings.

Medians of ``--repeat`` runs. Targets (issue "cohort database"): the whole screening under 15 s
on this 2-core CPU, and no stage more than 10 % above its standalone figure.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    args = parser.parse_args()

    import torch

    from fmmtc_core.atlas import load_atlas
    from fmmtc_core.explain import explain
    from fmmtc_core.io import load_scan
    from fmmtc_core.models.ensemble import load_model
    from fmmtc_core.preprocess import clean, parcellate
    from fmmtc_core.qc import qc_report
    from fmmtc_core.screening import screen
    from fmmtc_core.summary import attribution_rows, explanation_scores
    from fmmtc_core.simulate import demo_scan
    from fmmtc_core.store import open_database, session_scope
    from fmmtc_core.store import repository as repo

    torch.set_num_threads(2)
    bold, side, conf = demo_scan()
    model = load_model(args.model)
    atlas = load_atlas(model.atlas)
    tmp = Path(tempfile.mkdtemp(prefix="fmmtc-bench-"))
    engine = open_database(f"sqlite:///{tmp / 'bench.db'}")
    print(f"scan: {bold.name} ({bold.stat().st_size / 1e6:.0f} MB), model: {model.name}, "
          f"device: {model.device}")

    def standalone(i: int) -> dict:
        t = {}
        t0 = time.perf_counter()
        scan = load_scan(bold, sidecar=side, confounds=conf, atlas=atlas)
        t["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        raw = parcellate(scan, atlas)
        t["parcellate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        qc = qc_report(scan, raw)
        t["qc"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sig = clean(raw)
        t["clean"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        inputs = model.inputs(sig)  # the one screening path (window or whole-scan windows)
        w, fc, amp = inputs.window, inputs.fc, inputs.amplitude
        model.predict_proba(w[None], fc[None], None if amp is None else amp[None])
        t["predict"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        e = explain(model, w, fc, atlas=atlas, amplitude=amp)
        t["explain"] = time.perf_counter() - t0
        regions, connections = attribution_rows(*explanation_scores(e))
        t0 = time.perf_counter()
        with session_scope(engine, write=True) as s:
            p = repo.get_or_create_participant(s, f"BENCH-S{i}", actor="bench")
            mv = repo.get_or_create_model_version(s, model.name, model.weights_sha256,
                                                  model.card, actor="bench")
            repo.add_screening(
                s, participant=p, model_version=mv,
                scan_fields={"sha256": f"{i:064d}", "kind": "nifti", "shape": list(scan.shape),
                             "tr": sig.tr, "atlas": atlas.name, "qc_verdict": qc.verdict,
                             "qc": qc.to_dict(), "n_volumes": sig.n_volumes,
                             "n_regions": sig.n_regions,
                             "series": repo.encode_series(sig.data)},
                screening_fields={"inputs_sha256": f"{i:064d}", "probability": 0.5,
                                  "band_low": 0.4, "band_high": 0.6,
                                  "fold_probabilities": [0.5], "decision": "uncertain",
                                  "thresholds": {}, "share_ts": 0.0, "share_fc": 1.0,
                                  "ig_gap": e.ig_gap, "ig_steps": e.steps,
                                  "explanation": {"settings": e.settings,
                                                  "networks": e.networks},
                                  "runtime_s": 0.0, "stage_seconds": {},
                                  "software_version": "bench"},
                regions=regions, connections=connections, actor="bench")
        t["save"] = time.perf_counter() - t0
        return t

    def pipeline(i: int) -> tuple[dict, float]:
        t0 = time.perf_counter()
        r = screen(bold, "BENCH-P", model, engine, sidecar=side, confounds=conf, force=True,
                   operator="bench")
        return dict(r.analysis.stage_seconds), time.perf_counter() - t0

    standalone(-1)  # warm-up: atlas grid, torch kernels
    pipeline(-1)
    runs_alone = [standalone(i) for i in range(args.repeat)]
    runs_pipe = [pipeline(i) for i in range(args.repeat)]
    stages = list(runs_alone[0])
    alone = {k: statistics.median(r[k] for r in runs_alone) for k in stages}
    piped = {k: statistics.median(r[0].get(k, 0.0) for r in runs_pipe) for k in stages}
    wall = statistics.median(r[1] for r in runs_pipe)
    print(f"\nmedian of {args.repeat} runs (seconds)")
    print(f"{'stage':<12} {'standalone':>11} {'in screen()':>12} {'ratio':>7}")
    worst = 0.0
    for k in stages:
        ratio = piped[k] / alone[k] if alone[k] > 0 else float("nan")
        if alone[k] >= 0.05:  # ratios of sub-50 ms stages are timer noise
            worst = max(worst, ratio)
        print(f"{k:<12} {alone[k]:11.3f} {piped[k]:12.3f} {ratio:7.2f}")
    print(f"{'sum':<12} {sum(alone.values()):11.3f} {sum(piped.values()):12.3f}")
    print(f"\nscreen() wall time {wall:.2f} s (target < 15 s); sum of standalone stages "
          f"{sum(alone.values()):.2f} s; worst stage ratio (stages >= 50 ms) {worst:.2f} "
          "(target <= 1.10)")


if __name__ == "__main__":
    main()
