"""Benchmark: load + parcellate a 97x115x97x300 float32 scan, ours vs nilearn vs the I/O floor.

Run: ``python bench/bench_parcellate.py [--volumes 300] [--repeat 2] [--threads 2]``

Every method runs in its own fresh Python process (so peak memory is that method's alone) on
the same simulated scan, written once as ``.nii.gz`` and ``.nii``:

- ``io floor``: merely decompress and read the voxel payload into one array with one thread,
  with the inflater our one-thread reader uses (ISA-L through ``isal``; for ``.nii`` a plain
  read) - the single-thread lower bound for any method that reads the whole file; Python's own
  ``gzip`` module is shown for reference;
- the same read with rapidgzip on 1 and ``--threads`` threads (what our parallel reader
  decodes with): the per-thread rate the 16-core projection is made from; and, when
  ``indexed_gzip`` is importable, its best case for a scan read once: build the index (a full
  sequential pass), then read the halves in two threads;
- ``nilearn``: ``NiftiLabelsMasker(strategy="mean").fit_transform`` with the same atlas image;
- ``fmmtc``: ``load_scan`` + ``parcellate`` (fast path) with 1 read thread (ISA-L) and with
  ``--threads`` (rapidgzip), for ``.nii.gz``; for ``.nii`` (no decompression) the default.

Peak memory is the process's peak resident set size minus its size just before the measured
call (imports and atlas loading excluded). Times are the best of ``--repeat`` runs. Targets
(issue "core data path"): fmmtc >= 5x faster than nilearn, <= 1.3x the I/O floor, peak memory
<= 1.5x one decompressed copy of the data; (issue 15) ``.nii.gz`` load + parcellate with 2
threads <= 0.7x the single-thread ISA-L floor, output identical to nilearn's. The load
average is printed before and after: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def _status_mb(field: str) -> float:
    """A memory figure from /proc/self/status (VmRSS: now, VmHWM: peak), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_hwm() -> bool:
    """Reset the peak-RSS counter (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(method: str, path: str, out_npy: str) -> None:
    """Run one method once in this process and print a JSON line with its measurements."""
    import gzip

    import numpy as np

    from fmmtc_core.atlas import load_atlas

    atlas = load_atlas("hcpex")
    labels_img = atlas.labels_img
    if method == "nilearn":
        from nilearn.maskers import NiftiLabelsMasker

        masker = NiftiLabelsMasker(labels_img, strategy="mean", standardize=None)
    elif method.startswith("fmmtc"):
        from fmmtc_core.io import load_scan
        from fmmtc_core.preprocess import parcellate

        # "fmmtc-N": N read threads; "fmmtc": the default (FMMTC_READ_THREADS or the cores).
        threads = int(method.split("-")[1]) if "-" in method else None
    import nibabel as nib

    hdr = nib.load(path).header
    shape, dtype, offset = hdr.get_data_shape(), hdr.get_data_dtype(), int(hdr.get_data_offset())
    base = _status_mb("VmRSS")
    _reset_hwm()
    t0 = time.perf_counter()
    result = None
    if method.startswith("floor"):
        # One decompressed copy, read in 64 MB steps (readinto of a whole 1 GB view would
        # make GzipFile allocate a second copy).
        nbytes = int(np.prod(shape)) * dtype.itemsize
        buf = np.empty(nbytes, dtype=np.uint8)
        if method.startswith("floor-indexed_gzip"):
            _indexed_gzip_read(path, offset, buf, int(method.rsplit("-", 1)[1]))
        else:
            if not path.endswith(".gz"):
                opener = open
            elif method == "floor-stdlib":
                opener = gzip.open
            elif method.startswith("floor-rapidgzip"):
                import rapidgzip

                from fmmtc_core.io import _PARALLEL_CHUNK_BYTES

                n_threads = int(method.rsplit("-", 1)[1])

                def opener(p, mode):
                    return rapidgzip.RapidgzipFile(p, parallelization=n_threads,
                                                   chunk_size=_PARALLEL_CHUNK_BYTES)
            else:
                from fmmtc_core.io import _gzip  # the inflater our reader uses (ISA-L)

                opener = _gzip.open
            with opener(path, "rb") as f:
                f.read(offset)
                view, got = memoryview(buf), 0
                while got < nbytes:
                    n = f.readinto(view[got : got + 64 * 1024**2])
                    if not n:
                        break
                    got += n
    elif method == "nilearn":
        result = masker.fit_transform(path)
    else:
        result = parcellate(load_scan(path), atlas, threads=threads).data
    elapsed = time.perf_counter() - t0
    peak = _status_mb("VmHWM") - base
    if result is not None:
        np.save(out_npy, np.asarray(result))
    print(json.dumps({"method": method, "seconds": elapsed, "peak_mb": peak}))


def _indexed_gzip_read(path: str, offset: int, buf, n_threads: int) -> None:
    """indexed_gzip's best case for a file read once: build the seek-point index (one
    sequential zlib pass over the whole file), then read ``n_threads`` parts in parallel."""
    import threading

    import indexed_gzip

    with indexed_gzip.IndexedGzipFile(path, spacing=4 * 1024**2) as f:
        f.build_full_index()
        index = f"indexed_gzip_{os.getpid()}.gzidx"
        f.export_index(str(OUT / index))
    part = -(-buf.size // n_threads)

    def read(i: int) -> None:
        with indexed_gzip.IndexedGzipFile(path, index_file=str(OUT / index)) as g:
            g.seek(offset + i * part)
            view, got = memoryview(buf)[i * part : (i + 1) * part], 0
            want = len(view)
            while got < want:
                n = g.readinto(view[got : got + 64 * 1024**2])
                if not n:
                    break
                got += n

    workers = [threading.Thread(target=read, args=(i,)) for i in range(n_threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    (OUT / index).unlink()


def _make_scan(volumes: int) -> tuple[Path, Path]:
    """Simulate one subject on fMRIPrep's 2 mm grid and write it as .nii.gz and .nii."""
    import numpy as np

    from fmmtc_core import simulate
    from fmmtc_core.atlas import load_atlas

    OUT.mkdir(parents=True, exist_ok=True)
    gz, raw = OUT / f"sim_{volumes}.nii.gz", OUT / f"sim_{volumes}.nii"
    if gz.exists() and raw.exists():
        return gz, raw
    atlas = load_atlas("hcpex")
    config = simulate.SimulationConfig(n_volumes=volumes)
    rng = np.random.default_rng(0)
    subject = simulate.simulate_subject(atlas, responder=None, site=0, config=config, rng=rng)
    for path in (gz, raw):
        simulate.write_nifti(path, subject.signals, atlas, tr=subject.tr, dtype="float32",
                             rng=np.random.default_rng(1))
    return gz, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2,
                        help="read threads of the parallel rows (default 2)")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    import importlib.util

    import numpy as np

    print(f"simulating a 97x115x97x{args.volumes} float32 scan (cached in {OUT}) ...", flush=True)
    gz, raw = _make_scan(args.volumes)
    copy_mb = 97 * 115 * 97 * args.volumes * 4 / 1024**2
    load_before = os.getloadavg()
    n = args.threads
    gz_methods = ["floor", "floor-stdlib", "floor-rapidgzip-1", f"floor-rapidgzip-{n}"]
    if importlib.util.find_spec("indexed_gzip") is not None:
        gz_methods.append(f"floor-indexed_gzip-{n}")
    gz_methods += ["nilearn", "fmmtc-1", f"fmmtc-{n}"]
    rows = []
    for path in (gz, raw):
        res = {}
        methods = gz_methods if path.suffix == ".gz" else ["floor", "nilearn", "fmmtc"]
        for method in methods:
            best = None
            for _ in range(args.repeat):
                out_npy = str(OUT / f"{method}.npy")
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", method, str(path), out_npy],
                    capture_output=True, text=True, env=os.environ.copy(),
                )
                if proc.returncode != 0:
                    sys.exit(f"{method} failed:\n{proc.stderr}")
                m = json.loads(proc.stdout.strip().splitlines()[-1])
                if best is None or m["seconds"] < best["seconds"]:
                    best = m
            res[method] = best
        ref = np.load(OUT / "nilearn.npy")
        rel = {}
        for method in methods:
            if not method.startswith("fmmtc"):
                continue
            ours = np.load(OUT / f"{method}.npy")
            ours = ours[:, np.isfinite(ours).all(axis=0)]
            rel[method] = float(np.max(np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-12)))
        rows.append((path.name, res, rel))
    load_after = os.getloadavg()

    print()
    print(f"Load + parcellate, HCPEx (426 regions), one decompressed copy = {copy_mb:.0f} MB, "
          f"best of {args.repeat}, {os.cpu_count()} CPU cores, load average (1 min) "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print()
    print("| file | method | time (s) | peak memory (MB) | time / I/O floor | nilearn / fmmtc | "
          "memory / one copy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    labels = {
        "floor": "I/O floor: read, 1 thread (ISA-L inflate for .gz)",
        "floor-stdlib": "read with Python's gzip (reference)",
        "floor-rapidgzip-1": "read with rapidgzip, 1 thread",
        f"floor-rapidgzip-{n}": f"read with rapidgzip, {n} threads",
        f"floor-indexed_gzip-{n}": f"read with indexed_gzip: build index + {n} threads",
        "nilearn": "nilearn NiftiLabelsMasker",
        "fmmtc-1": "fmmtc load_scan + parcellate, 1 read thread (ISA-L)",
        f"fmmtc-{n}": f"fmmtc load_scan + parcellate, {n} read threads (rapidgzip)",
        "fmmtc": "fmmtc load_scan + parcellate",
    }
    for name, res, _ in rows:
        floor = res["floor"]["seconds"]
        for method, label in labels.items():
            if method not in res:
                continue
            m = res[method]
            speed = (f"{res['nilearn']['seconds'] / m['seconds']:.1f}x"
                     if method.startswith("fmmtc") else "")
            print(f"| {name} | {label} | {m['seconds']:.2f} | {m['peak_mb']:.0f} | "
                  f"{m['seconds'] / floor:.2f} | {speed} | {m['peak_mb'] / copy_mb:.2f} |")
    print()
    for name, _, rel in rows:
        for method, value in rel.items():
            print(f"max relative difference {method} vs nilearn ({name}): {value:.2e}")

    # Issue 15: the target on this machine, and what the per-thread rate projects for 16 cores.
    res_gz, res_raw = rows[0][1], rows[1][1]
    floor = res_gz["floor"]["seconds"]
    ours = res_gz[f"fmmtc-{n}"]["seconds"]
    print()
    print(f".nii.gz load + parcellate with {n} read threads: {ours:.2f} s = {ours / floor:.2f}x "
          f"the single-thread ISA-L floor ({floor:.2f} s); target <= 0.70x: "
          f"{'met' if ours <= 0.7 * floor else 'NOT met'}")
    one = res_gz["fmmtc-1"]["seconds"]
    print(f".nii.gz load + parcellate, {n} read threads vs 1 (ISA-L): {ours / one:.2f}x the time")
    cores = os.cpu_count() or 1
    if max(load_before[0], load_after[0]) > cores:
        print(f"WARNING: the load average ({load_before[0]:.1f} / {load_after[0]:.1f}) exceeded "
              f"the {cores} cores: other processes took CPU from every row, unevenly, so the "
              "ratios above (and the projection below) are not reliable; rerun on a quiet "
              "machine.")
    rg1 = res_gz["floor-rapidgzip-1"]["seconds"]
    rgn = res_gz[f"floor-rapidgzip-{n}"]["seconds"]
    rate = copy_mb / rg1  # MB/s that one rapidgzip thread decompresses
    eff = rg1 / (n * rgn)  # measured scaling from 1 to n threads
    parc = res_raw["fmmtc"]["seconds"]  # the same arithmetic without any decompression
    ideal16 = copy_mb / (16 * rate)
    real16 = ideal16 / min(eff, 1.0)
    proj = max(real16, parc)
    print(f"projection for 16 cores (not measured): one rapidgzip thread decompresses "
          f"{rate:.0f} MB/s; at the measured {n}-thread efficiency of {eff:.0%}, 16 threads "
          f"inflate the {copy_mb:.0f} MB in {real16:.2f} s (ideal {ideal16:.2f} s); the "
          f"parcellation arithmetic alone (.nii row) takes {parc:.2f} s, so load + parcellate "
          f"~ max of the two = {proj:.2f} s = {proj / floor:.2f}x the ISA-L floor, bounded by "
          f"{'the parcellation' if parc >= real16 else 'the inflate'}")


if __name__ == "__main__":
    main()
