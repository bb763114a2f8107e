"""Benchmark: scaling beyond one process (issue 16, item 4).

Run: ``python bench/bench_scale.py [--section all|ddp|screening] [--subjects 16] [--epochs 4]
[--config small] [--scans 6] [--format nifti|timeseries]``

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

Section "Cohort screening": ``screen_batch`` on a Dask ``LocalCluster`` (``fmmtc screen-batch
--cluster local:N``) with 1 and then 2 workers, on the same simulated cohort, each into a fresh
SQLite database, in this one run (so the ratio is measured under the same machine load, which
is printed: the machine may be shared). Each run reports

- **wall**: the whole batch, cluster start-up and each worker's model loading included;
- **steady**: scans per second between the first and the last stored screening (start-up
  excluded; with S scans, S - 1 intervals).

Then a **projection** for 10,000 scans on N CPU or GPU workers, from the per-scan stage costs
that every screening records (``screenings.stage_seconds``: load, parcellate, qc, clean,
predict, explain on the worker; save on the one writer) of the 1-worker run, each stage's
least-disturbed figure (its minimum over the scans: on a shared machine the median carries the
other tenants' load; both totals are printed) except the database write (its median), plus
the two costs this bench measures on their own: hashing a scan (the skip check, on a worker)
and decompressing it (inside ``parcellate`` for a ``.nii.gz``). Workers scale the worker
stages; the single writer does not, so the projection names the stage that bounds the wall
time: the largest worker stage (decompression + parcellation, or IG) until N reaches
(worker seconds per scan) / (writer seconds per scan), the database beyond. Prices are
assumptions (``--cpu-price``, ``--gpu-price``, per worker-hour), not quotes; the GPU line
assumes predict and IG cost nothing (a lower bound: they were not measured on a GPU here).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Scans in the projection.
PROJECTED_SCANS = 10_000


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


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def make_cohort(out_dir: str | os.PathLike, n_scans: int, fmt: str = "nifti",
                seed: int = 3) -> Path:
    """A simulated HCPEx cohort for the benchmark (demo model input).

    Parameters
    ----------
    out_dir : path
        Created; must not hold a cohort yet.
    n_scans : int
        Participants (one scan each), at least 2.
    fmt : {"nifti", "timeseries"}, default="nifti"
        ``.nii.gz`` on fMRIPrep's 2 mm grid (decompression and parcellation included) or region
        tables.
    seed : int, default=3
        Simulation seed.

    Returns
    -------
    Path
        The cohort folder.
    """
    from fmmtc_core.simulate import SimulationConfig, write_cohort

    return write_cohort(out_dir, n_scans, seed=seed, fmt=fmt,
                        config=SimulationConfig(n_volumes=200), dtype="int16")


def screen_batch_throughput(n_workers: int, cohort_dir: str | os.PathLike, *,
                            db_url: str | None = None, tolerance: float = 0.05) -> dict:
    """Screen a cohort on a ``LocalCluster`` of ``n_workers`` and time it.

    Parameters
    ----------
    n_workers : int
        Worker processes (``--cluster local:N``); each gets ``cpu_count // n_workers`` torch
        threads.
    cohort_dir : path
        BIDS-style cohort (:func:`make_cohort`).
    db_url : str or None, default=None
        Database; None: a fresh SQLite file in a temporary folder (removed after).
    tolerance : float, default=0.05
        IG relative completeness tolerance (``--tolerance``).

    Returns
    -------
    dict
        ``n_workers``, ``scans``, ``wall_s``, ``steady_scans_per_s`` (None with fewer than two
        scans), ``stage_seconds`` (one dict per stored screening) and ``load`` (the machine's
        load average when it finished).
    """
    from fmmtc_core.screening import screen_batch
    from fmmtc_core.store import open_database

    with tempfile.TemporaryDirectory(prefix="fmmtc-bench-scale-") as tmp:
        url = db_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        stamps: list[float] = []

        def progress(done, total, pid):
            if pid:
                stamps.append(time.perf_counter())

        t0 = time.perf_counter()
        rep = screen_batch(cohort_dir, url=url, cluster=f"local:{n_workers}",
                           explain_kwargs={"rel_tol": tolerance}, progress=progress)
        wall = time.perf_counter() - t0
        if rep.failed or rep.skipped:
            raise RuntimeError(f"benchmark batch did not screen everything: {rep}")
        engine = open_database(url)
        from sqlalchemy import text

        with engine.connect() as conn:
            rows = conn.execute(text("SELECT stage_seconds FROM screenings")).scalars().all()
        engine.dispose()
    import json

    stages = [json.loads(r) if isinstance(r, str) else dict(r) for r in rows]
    steady = ((len(stamps) - 1) / (stamps[-1] - stamps[0])) if len(stamps) > 1 else None
    return {"n_workers": n_workers, "scans": len(rep.screened), "wall_s": wall,
            "steady_scans_per_s": steady, "stage_seconds": stages, "load": _load()}


def standalone_costs(cohort_dir: str | os.PathLike) -> dict:
    """Median seconds per scan to hash its files and to decompress it (``.nii.gz`` only).

    Parameters
    ----------
    cohort_dir : path
        The cohort.

    Returns
    -------
    dict
        ``hash`` and ``decompress`` (0.0 for region tables), seconds.
    """
    from fmmtc_core.bids import read_cohort
    from fmmtc_core.screening import inputs_digest

    rows = read_cohort(cohort_dir, require_labels=False).participants.to_dict("records")
    hashing, inflate = [], []
    for row in rows:
        t0 = time.perf_counter()
        inputs_digest(row["scan"], None, row["confounds"])
        hashing.append(time.perf_counter() - t0)
        if str(row["scan"]).endswith(".gz"):
            try:
                from isal import igzip as gz  # the reader fmmtc_core.io uses when present
            except ImportError:  # pragma: no cover
                gz = gzip
            t0 = time.perf_counter()
            with gz.open(row["scan"], "rb") as f:
                while f.read(16 * 1024**2):
                    pass
            inflate.append(time.perf_counter() - t0)
    return {"hash": statistics.median(hashing),
            "decompress": statistics.median(inflate) if inflate else 0.0}


def projection(stages: list[dict], extra: dict, *, workers=(1, 8, 32, 128),
               cpu_price: float = 0.10, gpu_price: float = 1.00,
               scans: int = PROJECTED_SCANS) -> list[str]:
    """Lines projecting wall time and cost of ``scans`` scans on N workers.

    Parameters
    ----------
    stages : list of dict
        Stored ``stage_seconds`` of the measured screenings (the minimum per stage is used).
    extra : dict
        :func:`standalone_costs` (``hash``; ``decompress``, part of ``parcellate``).
    workers : tuple of int, default=(1, 8, 32, 128)
        Worker counts to project.
    cpu_price, gpu_price : float, default=0.10, 1.00
        Assumed price of one worker-hour (a worker as measured here: 2 cores; a GPU worker).
    scans : int, default=10_000
        Scans to project.

    Returns
    -------
    list of str
        The projection, one line each.
    """
    keys = [k for k in ("load", "parcellate", "qc", "clean", "predict", "explain", "save")
            if any(k in s for s in stages)]
    med = {k: min(s[k] for s in stages if k in s) for k in keys}
    median_total = sum(statistics.median(s[k] for s in stages if k in s) for k in keys)
    decompress = min(extra["decompress"], med.get("parcellate", 0.0))
    worker_stages = {
        "hash": extra["hash"],
        "decompression": decompress,
        "parcellation": med.get("load", 0.0) + med.get("parcellate", 0.0) - decompress,
        "qc + cleaning": med.get("qc", 0.0) + med.get("clean", 0.0),
        "predict": med.get("predict", 0.0),
        "IG": med.get("explain", 0.0),
    }
    # the writer's figure is the median, not the minimum: it bounds the wall time beyond the
    # knee, so err on the slow side (it is a SQLite write on local disk; a PostgreSQL server
    # across a network adds a round trip per statement)
    writer = statistics.median(s["save"] for s in stages if "save" in s) if "save" in med else 0.0
    lines = [f"per-scan cost (s; stored stages: minimum over {len(stages)} scans, their "
             f"medians sum to {median_total:.2f} s; hash and decompression: median standalone; "
             "database write: median): "
             + ", ".join(f"{k} {v:.3f}" for k, v in worker_stages.items())
             + f"; database write {writer:.3f}"]
    for kind, price, costs in (
            ("CPU", cpu_price, worker_stages),
            ("GPU", gpu_price, {k: (0.0 if k in ("predict", "IG") else v)
                                for k, v in worker_stages.items()})):
        w = sum(costs.values())
        knee = w / writer if writer > 0 else float("inf")
        top = max(costs, key=costs.__getitem__)
        lines.append(f"{kind} workers: {w:.2f} s of worker time per scan "
                     f"(largest: {top}, {costs[top] / w:.0%}); the one writer saturates at "
                     f"N = {knee:.0f} workers")
        for n in workers:
            wall = scans * max(w / n, writer)
            bound = (f"database write ({writer:.3f} s/scan, one writer)" if writer >= w / n
                     else f"{top}")
            cost = n * wall / 3600 * price
            lines.append(f"  {scans:,} scans on N={n:>3} {kind} workers: "
                         f"{wall / 3600:6.2f} h wall, ${cost:,.2f} at ${price:.2f}/worker-h; "
                         f"bound by {bound}")
    return lines


def cohort_screening_section(args: argparse.Namespace) -> None:
    """Section "Cohort screening": 1 vs 2 local workers in one run, then the projection."""
    with tempfile.TemporaryDirectory(prefix="fmmtc-bench-cohort-") as tmp:
        print(f"== Cohort screening ({args.scans} simulated {args.format} scans, demo model, "
              f"IG tolerance {args.tolerance}) ==")
        t0 = time.perf_counter()
        cohort = make_cohort(Path(tmp) / "cohort", args.scans, args.format)
        print(f"cohort written in {time.perf_counter() - t0:.1f} s; {_load()}")
        extra = standalone_costs(cohort)
        runs = {}
        for n in (1, 2):
            runs[n] = r = screen_batch_throughput(n, cohort, tolerance=args.tolerance)
            steady = r["steady_scans_per_s"]
            print(f"local:{n}: {r['scans']} scans in {r['wall_s']:.1f} s wall "
                  f"({r['scans'] / r['wall_s']:.3f} scans/s incl. start-up), steady "
                  f"{steady:.3f} scans/s; {r['load']}")
        one, two = runs[1], runs[2]
        print(f"ratio 2 vs 1 workers: wall {one['wall_s'] / two['wall_s']:.2f}x, steady "
              f"{two['steady_scans_per_s'] / one['steady_scans_per_s']:.2f}x")
        for line in projection(one["stage_seconds"], extra, cpu_price=args.cpu_price,
                               gpu_price=args.gpu_price):
            print(line)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_ddp_worker":  # run by torchrun
        _ddp_worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=("all", "ddp", "screening"), default="all",
                        help="which section to run (default: both)")
    ddp = parser.add_argument_group('section "DDP pretraining"')
    ddp.add_argument("--subjects", type=int, default=16)
    ddp.add_argument("--volumes", type=int, default=240)
    ddp.add_argument("--epochs", type=int, default=4)
    ddp.add_argument("--batch-size", type=int, default=8)
    ddp.add_argument("--config", default="small", choices=("tiny", "small", "base"))
    ddp.add_argument("--atlas", default="aal3")
    ddp.add_argument("--regions-per-step", type=int, default=64)
    ddp.add_argument("--nprocs", type=int, default=None,
                     help="processes of the DDP run (default: the cores, at least 2)")
    scr = parser.add_argument_group('section "Cohort screening"')
    scr.add_argument("--scans", type=int, default=6, help="cohort size (default 6)")
    scr.add_argument("--format", choices=("nifti", "timeseries"), default="nifti")
    scr.add_argument("--tolerance", type=float, default=0.05)
    scr.add_argument("--cpu-price", type=float, default=0.10,
                     help="assumed $ per 2-core CPU worker-hour")
    scr.add_argument("--gpu-price", type=float, default=1.00,
                     help="assumed $ per GPU worker-hour")
    args = parser.parse_args()
    if args.section in ("all", "ddp"):
        ddp_pretraining_section(args)
    if args.section in ("all", "screening"):
        if args.section == "all":
            print()
        cohort_screening_section(args)


if __name__ == "__main__":
    main()
