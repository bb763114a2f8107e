"""One place for the package's settings: defaults, environment variables and named constants.

Every environment variable the package reads is read here, and every number that more than one
module (or the CLI, the QC report and the dashboard) must agree on is named here. Nothing in
this module imports anything heavy, so the CLI can read settings before torch loads.

Environment variables
---------------------
``FMMTC_DATA_DIR``
    The data folder: the default SQLite database, staged uploads and (unless
    ``FMMTC_CACHE_DIR`` is set) the derived caches. Default ``$XDG_DATA_HOME/fmmtc``, else
    ``~/.local/share/fmmtc``.
``FMMTC_CACHE_DIR``
    Derived caches (the 2 mm atlas images, simulated demo scans, and matplotlib's font cache:
    see :func:`use_cache_dir_for_libraries`). Default: when ``FMMTC_DATA_DIR`` is set,
    ``<data folder>/cache`` (everything of a deployment stays under its data folder); else
    ``$XDG_CACHE_HOME/fmmtc``, else ``~/.cache/fmmtc``.
``FMMTC_DATABASE_URL``
    Any SQLAlchemy URL; default ``sqlite:///<data folder>/fmmtc.db``.
``FMMTC_MODEL_DIR``
    The model used when none is named; default the bundled demo model.
``FMMTC_MAX_SCAN_BYTES``
    Memory budget for one image, decided from its header (default 8 GiB).
``FMMTC_READ_THREADS``
    Threads that decompress one ``.nii.gz`` scan (1: ISA-L, one thread); default the usable
    cores, at most 8 (see :func:`fmmtc_core.io.default_read_threads`).
``FMMTC_DEVICE``
    ``cpu``, ``cuda`` or ``cuda:N``; default CUDA when available.
``FMMTC_OPERATOR``
    Who runs screenings when nobody is named.
``FMMTC_WORKER_THREADS``
    Threads of the dashboard's screening worker (default: the cores the server may use, but
    one, which is left to the server and the page; at least one).
``FMMTC_CLUSTER``
    Where the dashboard screens: unset, its own worker process (the default); ``local:N``, a
    Dask LocalCluster of N worker processes started by the server; ``tcp://HOST:PORT``, a
    running Dask scheduler (then the database must be PostgreSQL and the data folder on a
    filesystem every worker shares). See :mod:`fmmtc_core.cluster`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DEFAULT_THRESHOLDS",
    "BAND_PASS_HZ",
    "FD_THRESHOLD_MM",
    "STD_DVARS_THRESHOLD",
    "FD_MEAN_FAIL_MM",
    "DEFAULT_MAX_SCAN_BYTES",
    "data_dir",
    "cache_dir",
    "embedding_cache_dir",
    "use_cache_dir_for_libraries",
    "database_url",
    "model_dir_setting",
    "default_model_dir",
    "DEMO_MODEL_DIR",
    "max_scan_bytes_setting",
    "read_threads_setting",
    "device_setting",
    "operator_setting",
    "worker_threads_setting",
    "cluster_setting",
]

#: Decision thresholds on the calibrated probability: likely responder when the whole band is
#: at or above ``responder``, likely non-responder at or below ``non_responder``.
DEFAULT_THRESHOLDS = {"responder": 0.6, "non_responder": 0.4}

#: Band-pass of the cleaning step, Hz (the resting-state band).
BAND_PASS_HZ = (0.01, 0.1)

#: A volume is high-motion above this framewise displacement (Power et al. 2012), mm.
FD_THRESHOLD_MM = 0.5

#: ... or above this standardised DVARS.
STD_DVARS_THRESHOLD = 1.5

#: QC fails a scan whose mean framewise displacement exceeds this, mm.
FD_MEAN_FAIL_MM = 0.5

#: Default memory budget for one image (bytes), decided from its header.
DEFAULT_MAX_SCAN_BYTES = 8 * 1024**3


def _env(key: str) -> str | None:
    value = os.environ.get(key)
    return value if value else None


def data_dir() -> Path:
    """The data folder: the default database, staged uploads and (by default) the caches.

    Returns
    -------
    Path
        ``$FMMTC_DATA_DIR``, else ``$XDG_DATA_HOME/fmmtc``, else ``~/.local/share/fmmtc``
        (not created here).
    """
    env = _env("FMMTC_DATA_DIR")
    if env:
        return Path(env)
    xdg = _env("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "fmmtc"


def cache_dir() -> Path:
    """The folder of the derived caches (2 mm atlas images, simulated demo scans).

    Returns
    -------
    Path
        ``$FMMTC_CACHE_DIR``; else, when ``FMMTC_DATA_DIR`` is set, ``<data folder>/cache``;
        else ``$XDG_CACHE_HOME/fmmtc``, else ``~/.cache/fmmtc`` (not created here).
    """
    env = _env("FMMTC_CACHE_DIR")
    if env:
        return Path(env)
    if _env("FMMTC_DATA_DIR"):
        return data_dir() / "cache"
    xdg = _env("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fmmtc"


def use_cache_dir_for_libraries() -> Path | None:
    """Keep the caches of the libraries we draw with under our cache folder too.

    matplotlib (the glass brains, nilearn's views) writes a font cache and a config folder to
    ``~/.cache/matplotlib`` and ``~/.config/matplotlib`` unless ``MPLCONFIGDIR`` says
    otherwise. When the deployment names its folders (``FMMTC_CACHE_DIR`` or
    ``FMMTC_DATA_DIR``) and ``MPLCONFIGDIR`` is not set, this sets it to
    ``<cache folder>/matplotlib``, so nothing lands in the home folder. Call it before
    matplotlib is imported (it reads the variable once); a later call changes nothing for a
    matplotlib already loaded.

    Returns
    -------
    Path or None
        The folder ``MPLCONFIGDIR`` now names (created with mode 0700 when possible); None when
        it was left alone (already set, or neither folder variable is set).
    """
    if _env("MPLCONFIGDIR") or not (_env("FMMTC_CACHE_DIR") or _env("FMMTC_DATA_DIR")):
        return None
    folder = cache_dir() / "matplotlib"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        pass  # matplotlib falls back to a temporary folder, with a warning
    os.environ["MPLCONFIGDIR"] = str(folder)
    return folder


def embedding_cache_dir() -> Path:
    """The folder of cached foundation-encoder embeddings (safe to delete).

    Returns
    -------
    Path
        ``<cache folder>/embeddings`` (:func:`cache_dir`; not created here).
    """
    return cache_dir() / "embeddings"


def database_url() -> str:
    """The URL of the cohort database.

    Returns
    -------
    str
        ``$FMMTC_DATABASE_URL``, else ``sqlite:///<data folder>/fmmtc.db`` (see
        :func:`data_dir`).
    """
    return _env("FMMTC_DATABASE_URL") or f"sqlite:///{data_dir() / 'fmmtc.db'}"


#: The bundled demonstration model (trained on simulated data only).
DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "models" / "demo"


def model_dir_setting() -> Path | None:
    """The model folder named by the environment.

    Returns
    -------
    Path or None
        ``$FMMTC_MODEL_DIR``; None when unset or empty (then the bundled demo model is used).
    """
    env = _env("FMMTC_MODEL_DIR")
    return Path(env) if env else None


def default_model_dir() -> Path:
    """The model used when none is named.

    Returns
    -------
    Path
        ``$FMMTC_MODEL_DIR``, else :data:`DEMO_MODEL_DIR`.
    """
    return model_dir_setting() or DEMO_MODEL_DIR


def max_scan_bytes_setting() -> str | None:
    """The memory budget for one image, as the environment gives it.

    Returns
    -------
    str or None
        ``$FMMTC_MAX_SCAN_BYTES`` as written (validated where it is used); None when unset or
        empty (then :data:`DEFAULT_MAX_SCAN_BYTES` applies).
    """
    return _env("FMMTC_MAX_SCAN_BYTES")


def read_threads_setting() -> str | None:
    """How many threads decompress one ``.nii.gz`` scan, as the environment gives it.

    Returns
    -------
    str or None
        ``$FMMTC_READ_THREADS`` as written (validated by
        :func:`fmmtc_core.io.default_read_threads`); None when unset or empty (then the usable
        cores, at most :data:`fmmtc_core.io.MAX_DEFAULT_READ_THREADS`).
    """
    return _env("FMMTC_READ_THREADS")


def device_setting() -> str | None:
    """The device the environment asks for.

    Returns
    -------
    str or None
        ``$FMMTC_DEVICE`` as written (validated by
        :func:`fmmtc_core.models.device.select_device`); None when unset or empty (then CUDA
        when available, else CPU).
    """
    return _env("FMMTC_DEVICE")


def operator_setting() -> str | None:
    """Who runs screenings when nobody is named, as the environment gives it.

    Returns
    -------
    str or None
        ``$FMMTC_OPERATOR`` as written (validated where it is used); None when unset or empty.
    """
    return _env("FMMTC_OPERATOR")


def worker_threads_setting() -> str | None:
    """The dashboard worker's thread count, as the environment gives it.

    Returns
    -------
    str or None
        ``$FMMTC_WORKER_THREADS`` as written (validated by
        :func:`fmmtc_app.worker.worker_threads`); None when unset or empty (then all the
        cores the server may use but one, at least one).
    """
    return _env("FMMTC_WORKER_THREADS")


def cluster_setting() -> str | None:
    """Where the dashboard hands its screenings, as the environment gives it.

    Returns
    -------
    str or None
        ``$FMMTC_CLUSTER`` as written (``local:N`` or ``tcp://HOST:PORT``, validated by
        :func:`fmmtc_core.cluster.parse_cluster` where it is used); None when unset or empty
        (then the dashboard's own worker process screens, as without a cluster).
    """
    return _env("FMMTC_CLUSTER")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's or ``taskset``'s
    limit), not the machine's count; ``os.cpu_count()`` where affinity is unknown.

    Returns
    -------
    int
        At least 1.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def thread_count(name: str, value: str | int | None, *, cap: int | None = None) -> int:
    """A thread count from a setting: ``value`` when given, else the usable cores but one.

    The default leaves one core to the process that waits on these threads (the server for
    the dashboard's worker, the parcellation for the parallel reader).

    Parameters
    ----------
    name : str
        The setting's name, for the error message (e.g. ``"FMMTC_WORKER_THREADS"``).
    value : str or int or None
        A whole number >= 1 (surrounding spaces allowed); None or empty: the default.
    cap : int or None, default=None
        The most the default may be (an explicit ``value`` is taken as given).

    Returns
    -------
    int
        At least 1.

    Raises
    ------
    InvalidInputError
        ``value`` is not a whole number of at least 1.
    """
    from fmmtc_core._errors import InvalidInputError

    text = "" if value is None else str(value).strip()
    if not text:
        n = max(1, usable_cores() - 1)
        return n if cap is None else min(n, cap)
    if not text.isdigit() or int(text) < 1 or isinstance(value, bool):
        raise InvalidInputError(f"{name} must be a whole number of at least 1, got {value!r}.")
    return int(text)

