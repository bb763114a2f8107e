"""Benchmark: load + parcellate a 97x115x97x300 float32 scan, ours vs nilearn vs the I/O floor.

Run: ``python bench/bench_parcellate.py [--volumes 300] [--repeat 2] [--keep]``

Every method runs in its own fresh Python process (so peak memory is that method's alone) on
the same simulated scan, written once as ``.nii.gz`` and ``.nii``:

- ``io floor``: merely decompress and read the voxel payload into one array, with the inflater
  our reader uses (ISA-L through ``isal``; for ``.nii`` a plain read) - the lower bound for any
  method that reads the whole file; Python's own ``gzip`` module is shown for reference;
- ``nilearn``: ``NiftiLabelsMasker(strategy="mean").fit_transform`` with the same atlas image;
- ``fmmtc``: ``load_scan`` + ``parcellate`` (fast path).

Peak memory is the process's peak resident set size minus its size just before the measured
call (imports and atlas loading excluded). Times are the best of ``--repeat`` runs. Targets
(issue "core data path"): fmmtc >= 5x faster than nilearn, <= 1.3x the I/O floor, peak memory
<= 1.5x one decompressed copy of the data.
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
    elif method == "fmmtc":
        from fmmtc_core.io import load_scan
        from fmmtc_core.preprocess import parcellate
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
        if not path.endswith(".gz"):
            opener = open
        elif method == "floor-stdlib":
            opener = gzip.open
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
        result = parcellate(load_scan(path), atlas).data
    elapsed = time.perf_counter() - t0
    peak = _status_mb("VmHWM") - base
    if result is not None:
        np.save(out_npy, np.asarray(result))
    print(json.dumps({"method": method, "seconds": elapsed, "peak_mb": peak}))


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
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    import numpy as np

    print(f"simulating a 97x115x97x{args.volumes} float32 scan (cached in {OUT}) ...", flush=True)
    gz, raw = _make_scan(args.volumes)
    copy_mb = 97 * 115 * 97 * args.volumes * 4 / 1024**2
    rows = []
    for path in (gz, raw):
        res = {}
        methods = ("floor", "floor-stdlib", "nilearn", "fmmtc") if path.suffix == ".gz" else (
            "floor", "nilearn", "fmmtc")
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
        ours = np.load(OUT / "fmmtc.npy")
        ref = np.load(OUT / "nilearn.npy")
        present = np.isfinite(ours).all(axis=0)
        ours = ours[:, present]
        rel = float(np.max(np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-12)))
        rows.append((path.name, res, rel))

    print()
    print(f"Load + parcellate, HCPEx (426 regions), one decompressed copy = {copy_mb:.0f} MB, "
          f"best of {args.repeat}, {os.cpu_count()} CPU cores")
    print()
    print("| file | method | time (s) | peak memory (MB) | time / I/O floor | nilearn / fmmtc | "
          "memory / one copy |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, res, _ in rows:
        floor = res["floor"]["seconds"]
        for method, label in (("floor", "I/O floor: read (ISA-L inflate for .gz)"),
                              ("floor-stdlib", "read with Python's gzip (reference)"),
                              ("nilearn", "nilearn NiftiLabelsMasker"),
                              ("fmmtc", "fmmtc load_scan + parcellate")):
            if method not in res:
                continue
            m = res[method]
            speed = (f"{res['nilearn']['seconds'] / m['seconds']:.1f}x"
                     if method == "fmmtc" else "")
            print(f"| {name} | {label} | {m['seconds']:.2f} | {m['peak_mb']:.0f} | "
                  f"{m['seconds'] / floor:.2f} | {speed} | {m['peak_mb'] / copy_mb:.2f} |")
    print()
    for name, _, rel in rows:
        print(f"max relative difference fmmtc vs nilearn ({name}): {rel:.2e}")


if __name__ == "__main__":
    main()
