"""Benchmark: scaling beyond one process.

Run: ``python bench/bench_scale.py [--subjects 16] [--epochs 4] [--config small]``

Section "DDP pretraining": masked-reconstruction pretraining (:func:`fmmtc_core.pretraining
.pretrain`) launched by ``torchrun`` on this machine (gloo on CPU, static rendezvous on
127.0.0.1), on a simulated unlabelled corpus, with the same global batch in every run:

- 1 process with as many torch threads as the machine has cores (what a plain ``fmmtc
  pretrain`` does),
- 1 process with 1 thread (the per-core baseline),
- N processes with 1 thread each (``torchrun --nproc_per_node N``, N = the cores).

Steps per second are timed on rank 0 between the end of the first epoch and the end of the
last (start-up, corpus loading and the first epoch's warm-up excluded), all in this one run;
the machine's load average is printed before and after, since other jobs share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_pretraining_rate(nprocs: int, *, corpus: str | os.PathLike, workdir: str | os.PathLike,
                         threads: int = 1, config: str = "small", atlas: str = "aal3",
                         epochs: int = 4, batch_size: int = 8,
                         regions_per_step: int | None = 64) -> dict:
    """Pretraining steps per second with ``nprocs`` processes of ``threads`` threads each.

    Parameters
    ----------
    nprocs : int
        Processes (``torchrun --nproc_per_node``); 1 runs under torchrun too, so that every
        configuration pays the same start-up.
    corpus : path
        An unlabelled corpus (``fmmtc simulate --unlabelled``) in ``atlas``.
    workdir : path
        Where the run's output folder goes (one sub-folder per call).
    threads : int, default=1
        Torch threads per process.
    config, atlas, epochs, batch_size, regions_per_step
        As :func:`fmmtc_core.pretraining.pretrain`; ``batch_size`` is the global batch.

    Returns
    -------
    dict
        ``nprocs``, ``threads``, ``steps`` (timed), ``seconds`` (timed), ``steps_per_s``,
        ``wall_s`` (the whole launch) and ``final_loss``.
    """
    out = Path(workdir) / f"ddp_{nprocs}x{threads}"
    report = out.with_suffix(".json")
    kwargs = dict(corpus_dir=str(corpus), out_dir=str(out), config=config, atlas=atlas,
                  epochs=epochs, batch_size=batch_size, regions_per_step=regions_per_step,
                  seed=0, threads=threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), FMMTC_DEVICE="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p))
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                          f"--nproc_per_node={nprocs}", "--nnodes=1",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                          str(Path(__file__).resolve()), "_ddp_worker", json.dumps(kwargs),
                          str(report)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if run.returncode:
        raise RuntimeError(f"torchrun failed ({run.returncode}):\n{run.stderr[-3000:]}")
    rec = json.loads(report.read_text())
    log = json.loads((out / "pretrain_log.json").read_text())
    steps_per_epoch = log["steps"] // epochs
    stamps = rec["epoch_end_s"]
    steps = (len(stamps) - 1) * steps_per_epoch
    seconds = stamps[-1] - stamps[0]
    return {"nprocs": nprocs, "threads": threads, "steps": steps, "seconds": seconds,
            "steps_per_s": steps / seconds, "wall_s": wall,
            "final_loss": log["loss_per_epoch"][-1]}


def _ddp_worker(kwargs_json: str, report: str) -> None:
    """One torchrun process of :func:`ddp_pretraining_rate`: rank 0 records when each epoch
    ends."""
    from fmmtc_core.distributed import is_main_process
    from fmmtc_core.pretraining import pretrain

    stamps: list[float] = []
    pretrain(**json.loads(kwargs_json),
             progress=lambda stage, done, total, info: stamps.append(time.perf_counter())
             if stage == "pretrain" else None)
    if is_main_process():
        Path(report).write_text(json.dumps({"epoch_end_s": stamps}))


def ddp_pretraining_section(args: argparse.Namespace) -> None:
    """Section "DDP pretraining": 1 process (all cores, then 1 thread) vs N processes."""
    from fmmtc_core.simulate import SimulationConfig, write_cohort

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    nprocs = args.nprocs or max(2, cores)
    print("== DDP pretraining ==")
    print(f"config {args.config}, atlas {args.atlas}, {args.subjects} subjects, global batch "
          f"{args.batch_size}, {args.regions_per_step} regions per step, {args.epochs} epochs "
          f"(timed: epochs 2-{args.epochs}); {cores} cores; gloo on 127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        corpus = write_cohort(Path(tmp) / "corpus", args.subjects, seed=0, fmt="timeseries",
                              labelled=False, atlas=args.atlas,
                              config=SimulationConfig(n_volumes=args.volumes))
        opts = dict(corpus=corpus, workdir=tmp, config=args.config, atlas=args.atlas,
                    epochs=args.epochs, batch_size=args.batch_size,
                    regions_per_step=args.regions_per_step)
        load_before = os.getloadavg()
        runs = [ddp_pretraining_rate(1, threads=cores, **opts),
                ddp_pretraining_rate(1, threads=1, **opts),
                ddp_pretraining_rate(nprocs, threads=1, **opts)]
        load_after = os.getloadavg()
    print(f"{'processes x threads':>20} {'steps':>6} {'timed s':>8} {'steps/s':>8} "
          f"{'launch s':>9} {'final loss':>10}")
    for r in runs:
        print(f"{r['nprocs']:>10} x {r['threads']:<7} {r['steps']:>6} {r['seconds']:>8.2f} "
              f"{r['steps_per_s']:>8.3f} {r['wall_s']:>9.1f} {r['final_loss']:>10.4f}")
    full, single, ddp = runs
    print(f"ratio {nprocs} processes / 1 process ({cores} threads): "
          f"{ddp['steps_per_s'] / full['steps_per_s']:.2f}x")
    print(f"ratio {nprocs} processes / 1 process (1 thread): "
          f"{ddp['steps_per_s'] / single['steps_per_s']:.2f}x")
    print(f"load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, "
          f"after {tuple(round(x, 2) for x in load_after)}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_ddp_worker":  # run by torchrun
        _ddp_worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=16)
    parser.add_argument("--volumes", type=int, default=240)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--config", default="small", choices=("tiny", "small", "base"))
    parser.add_argument("--atlas", default="aal3")
    parser.add_argument("--regions-per-step", type=int, default=64)
    parser.add_argument("--nprocs", type=int, default=None,
                        help="processes of the DDP run (default: the cores, at least 2)")
    args = parser.parse_args()
    ddp_pretraining_section(args)


if __name__ == "__main__":
    main()
