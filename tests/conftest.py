"""Shared fixtures: tiny synthetic scans on a coarse MNI grid (never the network)."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

# Derived caches (the 2 mm atlas images) go to a per-session folder, never the user's home.
os.environ.setdefault("FMMTC_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".cache"))
# Databases the tests open without naming one land here, never in the user's data folder.
os.environ.setdefault("FMMTC_DATA_DIR", os.path.join(os.path.dirname(__file__), ".cache", "data"))
os.environ.pop("FMMTC_DATABASE_URL", None)
os.environ.pop("FMMTC_PASSWORD", None)

# --------------------------------------------------------------------------------------------
# Test tiers: `make test-fast` runs `-m "not slow and not postgres and not browser"`
# --------------------------------------------------------------------------------------------
#: Tests taking more than ~10 s on a 2-core machine, marked here for the modules whose tests
#: do not mark themselves (``file::test-name`` glob patterns, parametrisations included).
SLOW = (
    "test_training.py::*",  # pretraining and training runs
    "test_model_files.py::*",  # its module fixture trains a tiny model
    "test_cli.py::test_pretrain_train_evaluate_commands",
    "test_cli.py::test_explain_*",  # explanations of the session's simulated scans
    "test_explain.py::test_modality_share_follows_the_modality_that_carries_the_effect",
    "test_explain.py::test_demo_model_ranks_the_planted_regions_first",
    "test_screening.py::test_racing_writers_*",
    "test_screening.py::test_*_processes_*",
    "test_screening.py::test_batch_*",
    "test_screening.py::test_same_image_with_other_side_files_keeps_its_participant",
    "test_screening.py::test_same_image_without_its_side_files_is_refused_*",
    "test_screening.py::test_a_non_finite_model_output_names_the_model_and_stores_nothing",
    "test_screening.py::test_every_bad_input_leaves_every_table_unchanged",
    "test_screening.py::test_cli_screen_json_outcome_export",
)

#: Fixtures that start (or need) a PostgreSQL server.
POSTGRES_FIXTURES = {"pg_engine", "postgres_url"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        where = f"{Path(str(item.fspath)).name}::{item.name}"
        if any(fnmatch.fnmatchcase(where, pattern) for pattern in SLOW):
            item.add_marker(pytest.mark.slow)
        if POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


# --------------------------------------------------------------------------------------------
# No test may leave a process behind (the dashboard's worker, a batch pool, a server ...)
# --------------------------------------------------------------------------------------------
#: Seconds the child processes get to exit once the last test has finished.
ORPHAN_GRACE_S = 10.0

#: Helpers multiprocessing keeps for the life of the process that uses it: not leaks.
_INFRASTRUCTURE = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) for every process, from /proc (no psutil needed)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited meanwhile
            continue
        fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and ')'
        table[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return table


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def live_descendants(pid: int | None = None) -> dict[int, str]:
    """Running descendants of ``pid`` (default: this process) -> command line; zombies and
    multiprocessing's own helpers left out."""
    pid = os.getpid() if pid is None else pid
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, stack = {}, list(children.get(pid, []))
    while stack:
        child = stack.pop()
        stack.extend(children.get(child, []))
        if table[child][1] == "Z":
            continue
        cmd = _cmdline(child)
        if not any(name in cmd for name in _INFRASTRUCTURE):
            found[child] = cmd
    return found


def _become_subreaper() -> bool:
    """Adopt the orphans of our descendants (Linux ``PR_SET_CHILD_SUBREAPER``): a process left
    behind by a server that the tests started and stopped stays in our tree, where
    :func:`live_descendants` sees it, instead of moving to init."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def pytest_sessionstart(session):
    if Path("/proc/self/stat").exists():
        _become_subreaper()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when processes started by the tests outlive them (after a grace period).

    Checked here, after every fixture (the PostgreSQL server's included) has been torn down,
    not in a fixture whose teardown could run before another session fixture's."""
    if not Path("/proc/self/stat").exists():
        return  # not Linux: nothing to read
    deadline = time.monotonic() + ORPHAN_GRACE_S
    left = live_descendants()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = live_descendants()
    if left:
        listing = "\n".join(f"  pid {pid}: {cmd[:200]}" for pid, cmd in sorted(left.items()))
        session.config.get_terminal_writer().line(
            f"FAILED: {len(left)} process(es) started by the tests are still running "
            f"{ORPHAN_GRACE_S:g} s after the last test:\n{listing}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


#: A coarse 6 mm grid over MNI space: small enough for fast tests, still covers AAL3 well.
GRID_SHAPE = (31, 37, 31)
GRID_AFFINE = np.array(
    [[6.0, 0, 0, -90.0], [0, 6.0, 0, -126.0], [0, 0, 6.0, -72.0], [0, 0, 0, 1]]
)


@pytest.fixture
def rng():
    return np.random.default_rng(42)


@pytest.fixture(scope="session")
def aal3():
    from fmmtc_core.atlas import load_atlas

    return load_atlas("aal3")


@pytest.fixture(scope="session")
def grid_labels(aal3):
    return aal3.on_grid(GRID_SHAPE, GRID_AFFINE)


def make_bold(grid_labels, n_volumes=60, *, seed=0, baseline=800.0, noise=8.0, signal=None):
    """A 4D float32 array: brain voxels = baseline + region signal + voxel noise, background 0."""
    rng = np.random.default_rng(seed)
    reg = grid_labels.region_index
    brain = reg >= 0
    n_regions = grid_labels.n_voxels.size
    if signal is None:
        signal = rng.standard_normal((n_volumes, n_regions)) * 10.0
    data = np.zeros(GRID_SHAPE + (n_volumes,), dtype=np.float32)
    vox_noise = rng.standard_normal((int(brain.sum()), n_volumes)).astype(np.float32) * noise
    data[brain] = baseline + signal[:, reg[brain]].T + vox_noise
    return data


def save_nifti(path, data, *, tr=2.0, affine=GRID_AFFINE, dtype=None, nifti2=False,
               slope=None, inter=0.0, sidecar=None):
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    zooms = list(img.header.get_zooms())
    if len(zooms) == 4:
        zooms[3] = tr
        img.header.set_zooms(zooms)
    if dtype is not None:
        img.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    if sidecar is not None:
        stem = str(path).replace(".nii.gz", "").replace(".nii", "")
        with open(stem + ".json", "w") as f:
            json.dump(sidecar, f)
    return path


@pytest.fixture
def bold_file(tmp_path, grid_labels):
    """A valid 60-volume .nii.gz on the 6 mm grid, TR 2 s in the header."""
    return save_nifti(tmp_path / "sub-01_task-rest_bold.nii.gz", make_bold(grid_labels))


def fmriprep_confounds(n_volumes, *, seed=0, fd_scale=0.1, spikes=()):
    """An fMRIPrep-like confounds table (motion, FD, DVARS, CSF/WM, cosine regressors)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    cols = {}
    motion = np.cumsum(rng.standard_normal((n_volumes, 6)) * 0.02, axis=0)
    for i, name in enumerate(["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]):
        m = motion[:, i]
        d = np.diff(m, prepend=np.nan)
        cols[name] = m
        cols[f"{name}_derivative1"] = d
        cols[f"{name}_power2"] = m**2
        cols[f"{name}_derivative1_power2"] = d**2
    fd = np.abs(rng.standard_normal(n_volumes)) * fd_scale
    for s in spikes:
        fd[s] = 2.0
    fd[0] = np.nan
    cols["framewise_displacement"] = fd
    sd = 1.0 + np.abs(rng.standard_normal(n_volumes)) * 0.1
    sd[0] = np.nan
    cols["std_dvars"] = sd
    cols["dvars"] = sd * 20
    for name in ["csf", "white_matter", "global_signal"]:
        v = rng.standard_normal(n_volumes)
        d = np.diff(v, prepend=np.nan)
        cols[name] = v
        cols[f"{name}_derivative1"] = d
        cols[f"{name}_power2"] = v**2
        cols[f"{name}_derivative1_power2"] = d**2
    t = np.arange(n_volumes)
    for k in range(3):
        cols[f"cosine{k:02d}"] = np.cos(np.pi * (t + 0.5) * (k + 1) / n_volumes)
    return pd.DataFrame(cols)


@pytest.fixture(scope="session")
def hcpex_scans(tmp_path_factory):
    """One simulated responder as an HCPEx region table and as a 4 mm NIfTI (demo model input)."""
    from fmmtc_core.simulate import SimulationConfig, write_cohort

    root = tmp_path_factory.mktemp("hcpex")
    config = SimulationConfig(n_volumes=200)
    table = write_cohort(root / "tables", 2, seed=5, fmt="timeseries", config=config)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-96.0, -132.0, -78.0]
    nifti = write_cohort(root / "nifti", 2, seed=5, fmt="nifti", config=config,
                         shape=(49, 58, 49), affine=affine)
    pick = lambda d, pat: next(d.glob(f"sub-*/func/*{pat}"))  # noqa: E731
    return pick(table, "_seg-HCPEx_timeseries.tsv"), pick(nifti, "_bold.nii.gz")


def classic_folder(path, *, kind="amplitude", atlas="HCPEx", n_regions=426, seed=0):
    """Write a classic baseline's model folder with made-up weights (no training): for tests
    of the pages and of screening with a baseline model (``fmmtc train --model``)."""
    from fmmtc_core.models.classic import write_classic_folder

    rng = np.random.default_rng(seed)
    n = 4 * n_regions if kind == "amplitude" else n_regions * (n_regions - 1) // 2
    folds = []
    for _ in range(3):
        arrays = {"scaler_mean": rng.standard_normal(n), "scaler_scale": np.ones(n),
                  "coef": rng.standard_normal(n) * 0.01, "intercept": np.zeros(1)}
        if kind == "amplitude":
            arrays |= {"impute": np.zeros(n), "kept": np.ones(n, bool)}
        elif kind != "edges":
            raise ValueError("classic_folder writes amplitude or edges models")
        folds.append(arrays)
    card = {"name": Path(path).name, "intended_use": "Research only. Not a medical device.",
            "data": {"n_subjects": 24, "n_responders": 12, "simulated": True},
            "atlas": {"name": atlas, "n_regions": n_regions},
            "model": {"type": kind, "classic_baseline": True, "description": "made up",
                      "reference": "none", "n_regions": n_regions, "n_features": n,
                      "features": {"kind": kind, "n_features": n}},
            "training": {"folds": 3, "per_fold": [{"fold": k, "C": 1.0} for k in range(3)]},
            "calibration": {"method": "platt", "a": 1.0, "b": 0.0,
                            "bootstrap": [[1.0, 0.0], [0.8, 0.1]]},
            "metrics_out_of_fold": {"auc": 0.61, "warnings": []}, "warnings": []}
    return write_classic_folder(path, folds=folds, feature_mean=np.zeros(n), card=card)


def fake_screening(session, pseudonym="PAIN-0001", sha="a" * 64, prob=0.7, n_regions=3,
                   revision=0, site="S1", atlas="X", qc=None, fields=None):
    """Store a screening with made-up numbers through the repository (no model, no scan): for
    tests of the database, the export and the pages. Labels are not validated here, as rows
    written by an older version would not have been."""
    from fmmtc_core.store import repository as repo

    p = repo.get_or_create_participant(session, pseudonym, actor="t", site=site)
    mv = repo.get_or_create_model_version(session, "m", "f" * 64, {"name": "m"}, actor="t")
    scan = {"sha256": sha, "kind": "table", "shape": [100, n_regions], "tr": 2.0,
            "atlas": atlas, "qc_verdict": (qc or {}).get("verdict", "pass"),
            "qc": qc or {"reasons": []}, "n_volumes": 100,
            "n_regions": n_regions,
            "series": repo.encode_series(np.zeros((100, n_regions), np.float32))}
    fields = {"inputs_sha256": sha, "probability": prob, "band_low": prob - 0.1,
              "band_high": prob + 0.1, "fold_probabilities": [prob], "decision": "uncertain",
              "thresholds": {"responder": 0.6}, "share_ts": 0.1, "share_fc": 0.9,
              "ig_gap": 0.001, "ig_steps": 8, "explanation": {}, "runtime_s": 1.0,
              "stage_seconds": {}, "software_version": "0", **(fields or {})}
    regions = [{"region_index": i, "label": i + 1, "name": f"r{i}", "network": "N",
                "ts": 0.0, "fc": float(i), "total": float(i)} for i in range(n_regions)]
    conns = [{"rank": 0, "region_i": 0, "region_j": 1, "label_i": 1, "label_j": 2,
              "score": 0.5}]
    return repo.add_screening(session, participant=p, model_version=mv, scan_fields=scan,
                              screening_fields=fields, regions=regions, connections=conns,
                              actor="t", revision=revision)


# --------------------------------------------------------------------------------------------
# PostgreSQL: a real server on loopback
# --------------------------------------------------------------------------------------------
def _pg_bin() -> Path | None:
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / "initdb").exists() and (root / "pg_ctl").exists():
            return root
    return None


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """``FMMTC_TEST_POSTGRES_URL``, or a throw-away server started on loopback
    (Debian's postgresql package; ``.ci/run`` installs it), shared by the whole session."""
    url = os.environ.get("FMMTC_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql) and no "
                    "FMMTC_TEST_POSTGRES_URL")
    root = tmp_path_factory.mktemp("pg")
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        root.chmod(0o755)
        for parent in list(root.parents)[:-1]:
            parent.chmod(parent.stat().st_mode | 0o011)  # let postgres reach its folder
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust",
                    "-U", "fmmtc", "--no-sync"], check=True, capture_output=True)
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off"
    started = subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", opts,
                              "-w", "-l", str(root / "log"), "start"], capture_output=True)
    if started.returncode:
        pytest.skip(f"PostgreSQL did not start: {started.stderr.decode()[-300:]}")
    try:
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U",
                        "fmmtc", "fmmtc_test"], check=True, capture_output=True)
        yield f"postgresql+psycopg://fmmtc@127.0.0.1:{port}/fmmtc_test"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast",
                        "stop"], capture_output=True)


@pytest.fixture
def pg_engine(postgres_url):
    from fmmtc_core.store import make_engine

    engine = make_engine(postgres_url)
    from sqlalchemy import text

    with engine.begin() as conn:  # a fresh schema per test
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    yield engine
    engine.dispose()
