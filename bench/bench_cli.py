"""Benchmark: cold start of the ``fmmtc`` command, against the import it avoids.

Run: ``python bench/bench_cli.py [--repeat 5]``

Each row is a fresh ``python -m fmmtc_core.cli ...`` process (what the ``fmmtc`` script runs),
timed from spawn to exit: ``--help`` and refusals of bad input (a missing scan, a file that is
not a NIfTI, a missing cohort or checkpoint folder). The references, measured in the same run
with the same interpreter: ``python -c pass`` (the interpreter alone) and
``python -c "import torch"`` / ``"import torch, transformers"`` (what a sub-command would pay
if it imported the model stack at the top). Times are the best of ``--repeat`` runs; the
import column is one extra run under ``python -X importtime``: the time spent importing
(the sum of its self times, the interpreter's own start-up imports included) and the
heaviest top-level package. Target (issue 15): ``--help`` and every refusal under 1 s.
The load average is printed before and after: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _wall(argv: list[str], cwd: str, repeat: int) -> tuple[float, int]:
    """Best wall time of ``repeat`` runs of ``argv``, seconds, and the exit status."""
    best, code = float("inf"), 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True)
        best = min(best, time.perf_counter() - t0)
        code = proc.returncode
    return best, code


def _imports(argv: list[str], cwd: str) -> tuple[float, str]:
    """Seconds spent importing (sum of ``-X importtime`` self times) and the heaviest
    top-level package (by cumulative time)."""
    proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], cwd=cwd, env=_env(),
                          capture_output=True, text=True)
    total, top, top_us = 0, "", 0
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative, name = line[len("import time:"):].split("|")
        total += int(self_us)
        if not name.startswith("  ") and int(cumulative) > top_us:  # top level
            top, top_us = name.strip(), int(cumulative)
    return total / 1e6, f"{top} ({top_us / 1e6:.2f} s)" if top else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "notes.txt").write_text("not a scan\n")
        Path(tmp, "sub-01_bold.nii.gz").write_bytes(os.urandom(4096))
        cli = [py, "-m", "fmmtc_core.cli"]
        rows = [
            ("python -c pass (interpreter alone)", [py, "-c", "pass"], "reference"),
            ('python -c "import torch"', [py, "-c", "import torch"], "reference"),
            ('python -c "import torch, transformers"', [py, "-c", "import torch, transformers"],
             "reference"),
            ("fmmtc --help", [*cli, "--help"], "ours"),
            ("fmmtc qc missing.nii.gz", [*cli, "qc", "missing.nii.gz"], "ours"),
            ("fmmtc parcellate notes.txt --out x.tsv",
             [*cli, "parcellate", "notes.txt", "--out", "x.tsv"], "ours"),
            ("fmmtc screen sub-01_bold.nii.gz (not a NIfTI)",
             [*cli, "screen", "sub-01_bold.nii.gz"], "ours"),
            ("fmmtc explain sub-01_bold.nii.gz (not a NIfTI)",
             [*cli, "explain", "sub-01_bold.nii.gz"], "ours"),
            ("fmmtc train missing --out m", [*cli, "train", "missing", "--out", "m"], "ours"),
            ("fmmtc foundation inspect missing", [*cli, "foundation", "inspect", "missing"],
             "ours"),
        ]
        load_before = os.getloadavg()
        results = []
        for label, argv, kind in rows:
            seconds, code = _wall(argv, tmp, args.repeat)
            imported, top = _imports(argv, tmp)
            results.append((label, kind, seconds, code, imported, top))
        load_after = os.getloadavg()

    torch_s = next(r[2] for r in results if r[0] == 'python -c "import torch"')
    print(f"Cold start of `fmmtc`, best of {args.repeat} fresh processes, {os.cpu_count()} CPU "
          f"cores, load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print()
    print("| command | exit | wall (s) | / import torch | imports (s, -X importtime) | "
          "heaviest import |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, kind, seconds, code, imported, top in results:
        print(f"| {label} | {code} | {seconds:.2f} | {seconds / torch_s:.2f} | {imported:.2f} | "
              f"{top} |")
    ours = [r for r in results if r[1] == "ours"]
    worst = max(ours, key=lambda r: r[2])
    print()
    print(f"slowest of ours: {worst[0]}, {worst[2]:.2f} s ({worst[2] / torch_s:.2f}x `import "
          f"torch`, {torch_s:.2f} s); target < 1 s for --help and every refusal: "
          f"{'met' if worst[2] < 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
