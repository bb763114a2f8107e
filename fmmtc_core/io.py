"""Load and validate a participant's scan: a 4D NIfTI or a region time-series table.

:func:`load_scan` reads only headers, sidecars and small tables. It refuses bad input with an
:class:`~fmmtc_core.InvalidInputError` whose message names the problem and what was expected, and
it does so *before* any voxel is read: a 1 KB file whose header declares 100 GB never makes the
process allocate memory. Voxel data are read later, once, by :meth:`Scan.iter_blocks` (a single
decompression pass for ``.nii.gz``, a memory map for ``.nii``), so parcellation, QC statistics and
the data checks that need voxels (all-NaN, all-zero, constant) share one pass over the file.

Files are told apart by content (gzip, NIfTI-1/2 and NumPy magic numbers, text), not by name.

Every file is checked before it is opened: only regular files are accepted (a named pipe would
block the read forever, a device such as ``/dev/zero`` never ends), and side files are read only
up to a size cap (:data:`MAX_SIDECAR_BYTES`, :data:`MAX_TABLE_BYTES`,
:data:`MAX_LABEL_TABLE_BYTES`). Images -- scans and label atlases alike -- get a memory budget
decided from the header alone (:data:`DEFAULT_MAX_SCAN_BYTES`, ``$FMMTC_MAX_SCAN_BYTES``).
"""

from __future__ import annotations

import collections
import csv
import gzip
import hashlib
import io
import json
import math
import os
import queue
import re
import stat
import threading
import types
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import numpy as np

from fmmtc_core._docs import fill_doc
from fmmtc_core._errors import FMMTCWarning, InvalidInputError

if TYPE_CHECKING:  # loaded where used: refusing a missing or foreign file needs neither
    import pandas as pd

_gzip: types.ModuleType
_InflateError: type[Exception]
try:  # ISA-L inflates gzip about twice as fast as zlib (same format, same results).
    from isal import igzip as _gzip
    # isal's stub declares `error: Exception` (an instance); at run time it is the class.
    from isal.isal_zlib import error as _InflateError  # type: ignore[assignment]
except ImportError:  # pragma: no cover - isal is in requirements.txt; stay usable without it
    _gzip = gzip
    _InflateError = zlib.error

_GZIP_ERRORS = (EOFError, zlib.error, _InflateError, gzip.BadGzipFile, OSError)
# What rapidgzip raises on a damaged stream: RuntimeError ("Mismatching size ...", "End of file
# reached!") and ValueError ("Mismatching CRC32 ...", "Invalid deflate block found").
_PARALLEL_GZIP_ERRORS = (*_GZIP_ERRORS, RuntimeError, ValueError)

__all__ = [
    "Scan",
    "load_scan",
    "load_sidecar",
    "load_confounds_table",
    "find_sidecar",
    "write_upload",
    "default_read_threads",
    "MAX_DEFAULT_READ_THREADS",
    "DEFAULT_MIN_VOLUMES",
    "DEFAULT_MAX_SCAN_BYTES",
    "MAX_SIDECAR_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_TABLE_BYTES",
    "MAX_LABEL_TABLE_BYTES",
    "TR_RANGE_S",
]

#: Fewest volumes a scan may have (overridable per call).
DEFAULT_MIN_VOLUMES = 50
#: Largest decompressed voxel payload accepted, in bytes (``$FMMTC_MAX_SCAN_BYTES`` overrides).
#: A label atlas image gets the same budget, counted as float64 (the working copy of its labels).
DEFAULT_MAX_SCAN_BYTES = 8 * 1024**3
#: Largest BIDS JSON sidecar read, bytes. Real sidecars are a few KB (slice timing of a
#: multiband sequence adds a few hundred numbers).
MAX_SIDECAR_BYTES = 1024**2
#: Deepest nesting of JSON arrays and objects accepted in a sidecar (BIDS uses 2 or 3 levels).
MAX_JSON_DEPTH = 20
#: Largest text table read, bytes: an fMRIPrep confounds TSV or a region time-series TSV/CSV.
#: fMRIPrep confounds of 2,000 volumes with 500 columns (every CompCor component) are ~20 MB.
MAX_TABLE_BYTES = 64 * 1024**2
#: Largest atlas label table read, bytes (``<label> <name>`` lines or a BIDS ``dseg.tsv``;
#: 32,767 labels with long names stay under 4 MB).
MAX_LABEL_TABLE_BYTES = 16 * 1024**2
#: Plausible repetition times, seconds (multiband 0.1 s ... very slow sequences 10 s).
TR_RANGE_S = (0.1, 10.0)
# Disagreement between header TR and sidecar TR tolerated silently (relative).
_TR_TOLERANCE = 0.01
_NIFTI1_MAGICS = (b"n+1\x00", b"ni1\x00")
_NIFTI2_MAGICS = (b"n+2\x00", b"ni2\x00")
_NPY_MAGIC = b"\x93NUMPY"
_GZIP_MAGIC = b"\x1f\x8b"
# Voxel data are streamed in blocks of volumes of about this size.
_BLOCK_BYTES = 64 * 1024**2
#: Most threads :func:`default_read_threads` gives the decompression of one ``.nii.gz`` scan.
#: Each decoder thread keeps its own decoded chunks (about 50 MB each on fMRI data), and past
#: about 8 threads the parcellation arithmetic, not the inflate, is what the read waits for.
MAX_DEFAULT_READ_THREADS = 8
# Compressed bytes each rapidgzip decoder thread takes at a time (its default, 4 MiB): on a
# 150 MB scan that is ~37 chunks, enough to keep every thread busy to the end of the file.
_PARALLEL_CHUNK_BYTES = 4 * 1024**2


# --------------------------------------------------------------------------------------------
# File checks shared by every reader (scans, sidecars, confounds, label atlases and tables)
# --------------------------------------------------------------------------------------------
def _shown(text) -> str:
    """A name or path for a one-line message: as is when printable, else its ``repr``."""
    s = str(text)
    return s if s.isprintable() else repr(s)


def _one_line(exc) -> str:
    """The text of an exception on one line (pandas' parser messages end in a newline)."""
    return " ".join(str(exc).split())


def _size(n: float) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} bytes"


def _file_type(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check_regular_file(
    path: Path, what: str, expected: str, limit: int | None = None
) -> os.stat_result:
    """Stat ``path`` (never opening it) and refuse anything but a regular file under ``limit``.

    A named pipe would block the first read forever and a device such as ``/dev/zero`` never
    ends, so both are refused here, before any ``open``.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidInputError(f"{what} {_shown(path)} does not exist.") from None
    except OSError as exc:
        raise InvalidInputError(
            f"{what} {str(path)!r} cannot be read ({exc.strerror or exc}); expected {expected}."
        ) from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidInputError(f"{what} {str(path)!r} is a folder; expected {expected}.")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(
            f"{what} {str(path)!r} is not a regular file (it is {_file_type(st.st_mode)}); "
            f"expected {expected}."
        )
    if limit is not None and st.st_size > limit:
        raise InvalidInputError(
            f"{what} {str(path)!r} is {_size(st.st_size)} ({st.st_size} bytes), over the "
            f"{_size(limit)} limit for this kind of file; expected {expected}."
        )
    return st


def _open_regular(path: Path, what: str, expected: str):
    """Open a binary file for reading, refusing non-regular files without blocking.

    ``O_NONBLOCK`` makes the open of a named pipe return at once, so a pipe swapped in after
    the stat check is still refused by ``fstat`` instead of hanging the process.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise InvalidInputError(
            f"{what} {str(path)!r} cannot be read ({exc.strerror or exc}); expected {expected}."
        ) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InvalidInputError(
            f"{what} {str(path)!r} is not a regular file (it is {_file_type(mode)}); "
            f"expected {expected}."
        )
    return os.fdopen(fd, "rb")


def _read_capped(path: Path, what: str, expected: str, limit: int) -> bytes:
    """The bytes of a small side file: a regular file of at most ``limit`` bytes.

    The size is checked from ``stat`` before the read, and the read itself stops at
    ``limit + 1`` bytes, so a file that grows (or lies about its size) cannot exhaust memory.
    """
    _check_regular_file(path, what, expected, limit)
    with _open_regular(path, what, expected) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise InvalidInputError(
            f"{what} {str(path)!r} is over the {_size(limit)} limit for this kind of file; "
            f"expected {expected}."
        )
    return data


def file_sha256(path: str | os.PathLike, what: str = "File", chunk: int = 4 * 1024**2) -> str:
    """SHA-256 (hex) of a regular file's bytes, read in chunks: the package's one hasher.

    A named pipe or a device is refused before it is opened (see :func:`_check_regular_file`),
    so hashing never blocks or reads forever.

    Parameters
    ----------
    path : str or path
        The file to hash.
    what : str, default="File"
        What the file is, for error messages (e.g. ``"Scan"``).
    chunk : int, default=4 MiB
        Bytes read at a time.

    Returns
    -------
    str
        64 lowercase hexadecimal digits.

    Raises
    ------
    InvalidInputError
        ``path`` is missing, not a regular file or unreadable.
    """
    path = Path(path)
    _check_regular_file(path, what, "a regular file")
    h = hashlib.sha256()
    with _open_regular(path, what, "a regular file") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _memory_budget(max_bytes: int | None = None) -> int:
    """Largest in-memory image accepted, bytes: ``max_bytes``, else ``$FMMTC_MAX_SCAN_BYTES``,
    else 8 GiB."""
    if max_bytes is not None:
        return _check_positive_int("max_bytes", max_bytes, "a number of bytes")
    from fmmtc_core.config import max_scan_bytes_setting

    raw = max_scan_bytes_setting()
    if raw is None or not raw.strip():
        return DEFAULT_MAX_SCAN_BYTES
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 1:
        raise InvalidInputError(
            f"FMMTC_MAX_SCAN_BYTES is {raw!r}; expected a positive number of bytes "
            f"(default {DEFAULT_MAX_SCAN_BYTES})."
        )
    return int(value)


def default_read_threads() -> int:
    """Threads that decompress one ``.nii.gz`` scan when the caller names none.

    ``$FMMTC_READ_THREADS`` when set; else the cores this process may run on
    (``os.sched_getaffinity``, so a container's or ``taskset``'s limit is honoured) but one,
    which the parcellation arithmetic keeps busy, at most :data:`MAX_DEFAULT_READ_THREADS`.
    One thread reads with ISA-L; two or more with rapidgzip, which decompresses a single gzip
    stream in parallel. Why one core is left: on 2 cores the 2-thread read made load +
    parcellate 1.15x slower than ISA-L alone (2.51 s vs 2.19 s, ``bench/bench_parcellate.py``,
    2026-11-26) and took 672 MB instead of 179 MB - the decompression and the parcellation
    compete for the same cores - so parallel inflate only pays where cores are left over.

    Returns
    -------
    int
        At least 1.

    Raises
    ------
    InvalidInputError
        ``$FMMTC_READ_THREADS`` is not a positive whole number.
    """
    from fmmtc_core.config import read_threads_setting, thread_count

    return thread_count("FMMTC_READ_THREADS", read_threads_setting(),
                        cap=MAX_DEFAULT_READ_THREADS)


def _read_threads(threads) -> int:
    """``threads`` checked, or :func:`default_read_threads` for None."""
    if threads is None:
        return default_read_threads()
    return _check_positive_int(
        "threads", threads, "threads that decompress a .nii.gz scan; 1 reads with ISA-L"
    )


def _check_positive_int(name: str, value, meaning: str, flag: str | None = None) -> int:
    """Return ``value`` if it is an integer >= 1 (not a bool), else refuse it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        where = f" ({flag})" if flag else ""
        raise InvalidInputError(
            f"Invalid value for the {name!r} parameter{where}: expected a positive integer "
            f"({meaning}), but got {value!r} instead."
        )
    return int(value)


def _check_nifti_header(header, label: str) -> None:
    """Refuse NIfTI header fields that would make the read fail or the values lie.

    Checked from the header alone, before any voxel is read: the data offset, the scaling
    (``scl_slope``/``scl_inter``) and the qform quaternion. ``label`` names the file in the
    messages (e.g. ``"'scan.nii'"`` or ``"Atlas file 'a.nii'"``).

    Scaling follows the NIfTI standard as nibabel reads it: a slope of 0 or NaN means the data
    are stored unscaled (the intercept is then ignored). An infinite slope or intercept is
    refused, and so is a NaN intercept under a real slope (every value would be NaN).
    """
    import nibabel as nib

    if not isinstance(header, nib.Nifti1Header):  # Analyze headers have none of these fields
        return
    off = float(header["vox_offset"])
    single = bool(getattr(header, "is_single", True))
    min_off = int(header.single_vox_offset) if single else 0
    if not math.isfinite(off) or off < min_off or off != math.floor(off):
        where = (
            f"the data of a single-file NIfTI start after its {min_off}-byte header"
            if single else "a byte position"
        )
        raise InvalidInputError(
            f"{label} has an invalid NIfTI header: vox_offset is {off:g}; expected a whole "
            f"number >= {min_off} ({where})."
        )
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    for field_name, value in (("scl_slope", slope), ("scl_inter", inter)):
        if math.isinf(value):
            raise InvalidInputError(
                f"{label} has an invalid NIfTI header: {field_name} is {value:g}; expected a "
                "finite number (a slope of 0 or NaN means unscaled data)."
            )
    if math.isfinite(slope) and slope != 0 and math.isnan(inter):
        raise InvalidInputError(
            f"{label} has an invalid NIfTI header: scl_inter is NaN while scl_slope is "
            f"{slope:g}; expected a finite intercept for scaled data."
        )
    if int(header["qform_code"]) > 0:
        bcd = [float(header[k]) for k in ("quatern_b", "quatern_c", "quatern_d")]
        norm2 = sum(v * v for v in bcd) if all(math.isfinite(v) for v in bcd) else math.nan
        thresh = abs(float(getattr(header, "quaternion_threshold", 3.6e-7)))
        if not norm2 <= 1.0 + thresh:
            raise InvalidInputError(
                f"{label} has an invalid NIfTI header: the qform quaternion (b, c, d) = "
                f"({bcd[0]:g}, {bcd[1]:g}, {bcd[2]:g}) has b^2+c^2+d^2 = {norm2:.6g}; expected "
                "at most 1 (a unit quaternion) since qform_code is set."
            )


def _parse_nifti_header(head: bytes, kind: str):
    """The fixed NIfTI-1/2 header at the start of ``head`` (nibabel header, unchecked).

    Only the fixed part is parsed, as if there were no extensions: they are not needed here,
    and parsing them from the first KB would fail on a long (e.g. AFNI) extension.
    """
    import nibabel as nib

    if kind == "nifti1":
        cls = nib.Nifti1Header if head[344:348] == b"n+1\x00" else nib.nifti1.Nifti1PairHeader
        size = 348
    else:
        cls = nib.Nifti2Header if head[4:8] == b"n+2\x00" else nib.nifti2.Nifti2PairHeader
        size = 540
    return cls.from_fileobj(io.BytesIO(head[:size] + b"\x00" * 4), check=False)


def _peek_nifti_header(path: Path):
    """The NIfTI-1/2 header of a (possibly gzipped) file, or None if it does not hold one.

    Reads at most 1 KB of content; the caller has checked that ``path`` is a regular file.
    """
    with _open_regular(path, "File", "a NIfTI image") as f:
        head = f.read(1024)
    if head[:2] == _GZIP_MAGIC:
        try:
            with _gzip.open(path, "rb") as f:
                head = f.read(1024)
        except _GZIP_ERRORS:
            return None
    if len(head) >= 348 and head[344:348] in _NIFTI1_MAGICS:
        kind = "nifti1"
    elif len(head) >= 540 and head[4:8] in _NIFTI2_MAGICS:
        kind = "nifti2"
    else:
        return None
    try:
        header = _parse_nifti_header(head, kind)
    except Exception:
        return None
    ndim = int(header["dim"][0])
    return header if 1 <= ndim <= 7 else None  # nonsense ranks: the image reader reports them


def space_unknown_message(path: str | os.PathLike) -> str:
    """The warning (and QC reason) for a NIfTI whose header sets no orientation.

    Parameters
    ----------
    path : str or path
        The scan; only its file name is used.

    Returns
    -------
    str
        One sentence: the space is unknown, what was assumed, and what was expected.
    """
    return (
        f"{Path(path).name!r} has no orientation in its NIfTI header (qform_code and "
        "sform_code are both 0), so its space is unknown; it was placed on nibabel's default "
        "centred grid and read as MNI. Expected an MNI-space image (e.g. fMRIPrep "
        "space-MNI152NLin2009cAsym); check the atlas overlay."
    )


@dataclass(eq=False)
class Scan:
    """A validated scan, with its voxel data still on disk (NIfTI) or in memory (table).

    Attributes
    ----------
    path : Path
        The file the scan came from.
    kind : {"nifti", "table"}
        What the content is.
    n_volumes : int
        Number of time points.
    tr : float
        Repetition time, seconds.
    spatial_shape : tuple of 3 int or None
        NIfTI grid (X, Y, Z); None for tables.
    affine : ndarray (4, 4) or None
        NIfTI voxel-to-mm affine; None for tables.
    table : ndarray (T, R) of float64 or None
        Region time series of a table, columns in the atlas's region order.
    atlas_name : str or None
        Atlas of a table (bundled key or label-image path); None for NIfTI.
    confounds : pandas.DataFrame or None
        fMRIPrep confounds, one row per volume, when given.
    sidecar : dict
        The BIDS JSON sidecar (empty when none).
    warnings : list of str
        Recoverable oddities found while loading; the QC report carries them.
    space_known : bool
        False for a NIfTI whose header sets no orientation (qform and sform codes both 0): its
        affine is nibabel's default and the QC verdict is at least "warn".
    """

    path: Path
    kind: str
    n_volumes: int
    tr: float
    spatial_shape: tuple[int, int, int] | None = None
    affine: np.ndarray | None = None
    table: np.ndarray | None = None
    atlas_name: str | None = None
    confounds: pd.DataFrame | None = None
    sidecar: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    space_known: bool = True
    # NIfTI storage details used by iter_blocks.
    _dtype: np.dtype | None = None
    _offset: int = 0
    _slope: float = 1.0
    _inter: float = 0.0
    _compressed: bool = False
    _sha256: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """(X, Y, Z, T) for a NIfTI, (T, R) for a table."""
        if self.kind == "nifti":
            assert self.spatial_shape is not None  # set for every NIfTI scan
            return (*self.spatial_shape, self.n_volumes)
        assert self.table is not None  # set for every table scan
        return tuple(self.table.shape)

    @property
    def n_voxels(self) -> int:
        """Voxels per volume (NIfTI) or regions (table)."""
        if self.kind == "nifti":
            assert self.spatial_shape is not None  # set for every NIfTI scan
            return int(np.prod(self.spatial_shape))
        assert self.table is not None  # set for every table scan
        return self.table.shape[1]

    @property
    def scale(self) -> tuple[float, float]:
        """(slope, intercept) that turn stored values into data values."""
        return self._slope, self._inter

    def iter_blocks(
        self, block_bytes: int = _BLOCK_BYTES, *, threads: int | None = None,
        hold: int | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_volume, block)`` with ``block`` of shape (k, n_voxels), unscaled.

        Voxels are in NIfTI (Fortran) order within each volume. ``.nii`` files are memory
        mapped; ``.nii.gz`` files are decompressed once, block by block (in a background
        thread, one block ahead), so memory stays at a few blocks whatever the scan length.
        Apply :attr:`scale` to the values (or to anything linear computed from them).

        Parameters
        ----------
        block_bytes : int, default=64 MiB
            Target size of a block; a block holds at least one volume.
        threads : int or None, default=None
            Threads that decompress a ``.nii.gz`` file: 1 inflates with ISA-L in one thread;
            2 or more decompress the single gzip stream in parallel with rapidgzip (same
            bytes). None: :func:`default_read_threads` (``$FMMTC_READ_THREADS``, else the
            usable cores but one, at most 8). Ignored for ``.nii`` files.
        hold : int or None, default=None
            A promise by the caller: when it asks for the next block, it still uses at most
            the ``hold`` blocks it was given last (a copy made from a block does not count).
            The memory of older blocks is then reused for new ones, which spares the page
            faults of a fresh 64 MiB buffer per block (parallel decompression only). None
            (the default): every block has memory of its own, kept as long as it is used.

        Yields
        ------
        first_volume : int
            Index of the block's first volume.
        block : ndarray (k, n_voxels)
            The stored values of volumes ``first_volume`` to ``first_volume + k - 1``, in the
            file's data type (read-only; a memory map for ``.nii``).

        Raises
        ------
        TypeError
            The scan is a table (its values are already in :attr:`table`).
        InvalidInputError
            A ``.nii.gz`` file is truncated or its gzip stream is corrupt; ``threads`` is not
            a positive integer.
        """
        if self.kind != "nifti":
            raise TypeError("iter_blocks reads NIfTI voxel data; a table is already in memory.")
        n_threads = _read_threads(threads)
        if hold is not None:
            hold = _check_positive_int("hold", hold, "blocks the caller still uses")
        nvox = self.n_voxels
        assert self._dtype is not None  # set by load_scan for every NIfTI scan
        itemsize = self._dtype.itemsize
        k = max(1, min(self.n_volumes, block_bytes // max(1, nvox * itemsize)))
        if not self._compressed:
            # One short-lived map per block: unmapping it returns its pages, so the resident
            # memory stays at one block instead of growing to the whole file.
            for t0 in range(0, self.n_volumes, k):
                n = min(k, self.n_volumes - t0)
                mm = np.memmap(
                    self.path, dtype=self._dtype, mode="r",
                    offset=self._offset + t0 * nvox * itemsize, shape=(n, nvox),
                )
                yield t0, mm
                del mm
            return
        yield from self._iter_gzip_blocks(k, n_threads, hold)

    def _iter_gzip_blocks(
        self, k: int, threads: int = 1, hold: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Decompress in a background thread, one block ahead of the consumer.

        The inflater (ISA-L, or zlib) releases the GIL, so on two or more cores decompression of
        block i+1 overlaps the consumer's work on block i and the whole read costs about the
        decompression alone. With ``threads`` >= 2, rapidgzip decodes the one gzip stream in
        ``threads`` threads of its own (it finds deflate block boundaries by itself, so any
        gzip file works; no index is needed) and this thread merely copies its output into
        the blocks, recycling their memory when the consumer promised how long it ``hold``s
        them.
        At most three blocks are alive at once (consumer, queue, worker), plus the ``hold``
        blocks the consumer still uses.
        """
        nvox = self.n_voxels
        assert self._dtype is not None  # set by load_scan for every NIfTI scan
        vol_bytes = nvox * self._dtype.itemsize
        ready: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        parallel = threads > 1 and _parallel_gzip_ok(
            self.path, self._offset + self.n_volumes * vol_bytes
        )

        # Buffers the consumer has released (see `hold`), for the producer to fill again.
        free: queue.SimpleQueue = queue.SimpleQueue()

        def read_block(f, size: int):
            if not parallel:
                # read() hands over the decompressed bytes without the extra copy readinto()
                # makes in GzipFile.
                return f.read(size), None
            try:
                owner = free.get_nowait()
            except queue.Empty:
                owner = np.empty(k * vol_bytes, dtype=np.uint8)
            buf = owner[:size]
            view, got = memoryview(buf), 0
            while got < size:  # rapidgzip's readinto copies out of its decoded chunks
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            return (buf if got == size else buf[:got]), owner

        def produce() -> None:
            try:
                with _open_gzip(self.path, threads if parallel else 1) as f:
                    _skip(f, self._offset)
                    for t0 in range(0, self.n_volumes, k):
                        n = min(k, self.n_volumes - t0)
                        data, owner = read_block(f, n * vol_bytes)
                        if len(data) < n * vol_bytes:
                            put(InvalidInputError(
                                f"{_shown(self.path.name)} is truncated: the header declares "
                                f"{self.n_volumes} volumes but the file ends inside volume "
                                f"{t0 + len(data) // vol_bytes + 1}."
                            ))
                            return
                        if not put((t0, n, data, owner)):
                            return
                    if parallel and f.readinto(bytearray(1)):
                        # The trailer's size said the stream ends here; reading on to its end
                        # also makes rapidgzip check the CRC-32.
                        raise EOFError("more data than the gzip trailer declares")
            except _PARALLEL_GZIP_ERRORS as exc:
                put(InvalidInputError(
                    f"{_shown(self.path.name)} is a truncated or corrupt gzip file "
                    f"({_one_line(exc)}); "
                    "re-export or re-copy the scan."
                ))
                return
            put(None)

        worker = threading.Thread(target=produce, name="fmmtc-gunzip", daemon=True)
        worker.start()
        given: collections.deque = collections.deque()  # buffers the consumer may still use
        try:
            while True:
                item = ready.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                t0, n, data, owner = item
                block = np.frombuffer(data, dtype=self._dtype).reshape(n, nvox)
                block.flags.writeable = False  # as for bytes from ISA-L and .nii memory maps
                del data, item
                yield t0, block
                del block
                # The consumer asks for the next block: by its promise it uses at most the last
                # `hold` ones now, so older buffers may be filled again.
                if hold is not None and owner is not None:
                    given.append(owner)
                    while len(given) > hold:
                        free.put(given.popleft())
                del owner
        finally:
            stop.set()
            worker.join(timeout=5)


def _parallel_gzip_ok(path: Path, expected: int) -> bool:
    """Whether ``path`` may be read with rapidgzip: it is installed and the gzip trailer's
    size field (ISIZE, the decompressed length modulo 2**32) matches ``expected``.

    A truncated or damaged file fails this check and is read by ISA-L instead, which names
    the problem in the same words as for any other reader; rapidgzip would print its own
    diagnostics to stderr, where the CLI promises one ``error:`` line. A multi-member file
    or one with bytes after the image also goes to ISA-L: correct, only not parallel.
    """
    try:
        import rapidgzip  # noqa: F401
    except ImportError:  # pragma: no cover - rapidgzip is in requirements.txt
        return False
    try:
        with _open_regular(path, "Scan file", "a .nii.gz image") as f:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
    except (OSError, InvalidInputError):
        return False
    return isize == expected % 2**32


def _open_gzip(path: Path, threads: int):
    """A binary reader of the decompressed content of ``path``: ISA-L for one thread, else
    rapidgzip with ``threads`` decoder threads."""
    if threads <= 1:
        return _gzip.open(path, "rb")
    import rapidgzip

    return rapidgzip.RapidgzipFile(
        str(path), parallelization=threads, chunk_size=_PARALLEL_CHUNK_BYTES
    )


def _skip(f, n: int) -> None:
    while n > 0:
        chunk = f.read(min(n, 1024**2))
        if not chunk:
            raise EOFError("file ends inside the NIfTI header")
        n -= len(chunk)


def write_upload(data: bytes | bytearray | memoryview | IO[bytes], name: str,
                 folder: str | os.PathLike) -> Path:
    """Write an uploaded file (bytes or a binary file object) into ``folder`` under a safe name.

    Only the last path component of ``name`` is kept and characters outside ``[A-Za-z0-9._-]``
    become ``_``, so a crafted name cannot escape ``folder``. The extension is preserved because
    sidecars and confounds are matched by name.

    Parameters
    ----------
    data : bytes, bytearray, memoryview or binary file object
        The upload's content; a file object is rewound (when it can seek) and copied in chunks.
    name : str
        The name the client gave the file.
    folder : str or path
        Where to write it (created when missing).

    Returns
    -------
    Path
        The written file: ``folder`` / the sanitised name (``upload`` when nothing is left).
    """
    base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(str(name).replace("\\", "/")).name).lstrip(".")
    if not base:
        base = "upload"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / base
    with open(target, "wb") as out:
        if isinstance(data, (bytes, bytearray, memoryview)):
            out.write(data)
        elif isinstance(data, io.BytesIO):
            # Streamlit's UploadedFile: getvalue() hands over the bytes it holds without a
            # copy (getbuffer() copied a BytesIO made from bytes: 0.1 s and the upload's size
            # again in memory for a 155 MB scan).
            out.write(data.getvalue())
        else:
            if hasattr(data, "seek"):
                data.seek(0)
            for chunk in iter(lambda: data.read(8 * 1024**2), b""):
                out.write(chunk)
    return target


# --------------------------------------------------------------------------------------------
# Sidecars and confounds
# --------------------------------------------------------------------------------------------
def _strip_ext(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".tsv", ".csv", ".npy", ".txt", ".gz"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def find_sidecar(path: str | os.PathLike) -> Path | None:
    """The BIDS JSON sidecar beside ``path`` (same name, ``.json``), or None.

    Anything but a folder under that name is returned, so that a named pipe or a device posing
    as the sidecar is refused by :func:`load_sidecar` rather than silently ignored.

    Parameters
    ----------
    path : str or path
        The scan (NIfTI or table).

    Returns
    -------
    Path or None
        ``<scan name without extension>.json`` when it exists, else None.
    """
    path = Path(path)
    cand = path.with_name(_strip_ext(path) + ".json")
    return cand if cand.exists() and not cand.is_dir() else None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _json_depth(text: str) -> int:
    """Deepest nesting of arrays/objects in JSON text (brackets inside strings not counted).

    Counted without recursion, so ``"[" * 100000`` costs one vectorised pass, not a
    ``RecursionError`` inside :func:`json.loads`.
    """
    body = np.frombuffer(_JSON_STRING.sub('""', text).encode("utf-8", "surrogatepass"), np.uint8)
    step = ((body == ord("[")) | (body == ord("{"))).astype(np.int64)
    step -= ((body == ord("]")) | (body == ord("}"))).astype(np.int64)
    return int(np.cumsum(step).max(initial=0))


def load_sidecar(path: str | os.PathLike) -> dict:
    """Read a BIDS JSON sidecar; refuse files that are not a small JSON object.

    Only a regular file of at most :data:`MAX_SIDECAR_BYTES` is read, nested at most
    :data:`MAX_JSON_DEPTH` levels. A UTF-8 byte-order mark is accepted.

    Parameters
    ----------
    path : str or path
        The ``.json`` sidecar.

    Returns
    -------
    dict
        The JSON object.

    Raises
    ------
    InvalidInputError
        Not a regular file, too large, too deeply nested, not UTF-8, not JSON or not an object.
    """
    path = Path(path)
    expected = 'a BIDS JSON sidecar such as {"RepetitionTime": 2.0}'
    raw = _read_capped(path, "Sidecar", expected, MAX_SIDECAR_BYTES)
    try:
        text = raw.decode("utf-8-sig")
        depth = _json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise InvalidInputError(
                f"Sidecar {path.name!r} nests JSON arrays/objects {depth} levels deep; expected "
                f"at most {MAX_JSON_DEPTH} ({expected})."
            )
        data = json.loads(text)
    except RecursionError:
        raise InvalidInputError(
            f"Sidecar {path.name!r} nests JSON too deeply; expected at most {MAX_JSON_DEPTH} "
            f"levels ({expected})."
        ) from None
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, huge ints
        if isinstance(exc, InvalidInputError):
            raise
        raise InvalidInputError(
            f"Sidecar {_shown(path.name)} is not valid JSON ({_one_line(exc)}); expected a "
            'BIDS JSON object such as {"RepetitionTime": 2.0}.'
        ) from None
    if not isinstance(data, dict):
        raise InvalidInputError(
            f"Sidecar {_shown(path.name)} must hold a JSON object, not {type(data).__name__}."
        )
    return data


def _check_confounds(df: pd.DataFrame, label: str, n_volumes: int | None) -> pd.DataFrame:
    """Numbers or NaN only (fMRIPrep writes ``n/a`` in the first row of derivatives), no
    infinities, one row per volume."""
    import pandas as pd

    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise InvalidInputError(
            f"{label} has non-numeric columns {bad[:5]}; expected fMRIPrep "
            "confounds (numbers or n/a)."
        )
    for col in df.columns:
        values = df[col].to_numpy(dtype=np.float64)
        inf = np.flatnonzero(np.isinf(values))
        if inf.size:
            raise InvalidInputError(
                f"{label} has non-finite values ({values[inf[0]]:g}) in column {str(col)!r} "
                f"({inf.size} row(s), first at data row {inf[0] + 1}); expected finite numbers "
                "or n/a."
            )
    if n_volumes is not None and len(df) != n_volumes:
        raise InvalidInputError(
            f"{label} has {len(df)} rows but the scan has {n_volumes} "
            "volumes; give the confounds of this run."
        )
    return df


def load_confounds_table(path: str | os.PathLike, n_volumes: int | None = None) -> pd.DataFrame:
    """Read an fMRIPrep ``desc-confounds_timeseries.tsv`` and check it.

    Only a regular file of at most :data:`MAX_TABLE_BYTES` is read. Values must be numbers or
    ``n/a`` (infinities are refused, naming the column), with one row per volume when
    ``n_volumes`` is given. A UTF-8 byte-order mark is accepted.

    Parameters
    ----------
    path : str or path
        The confounds table (tab-separated, a header of confound names).
    n_volumes : int or None, default=None
        Volumes of the scan; the table must have that many rows. None checks no row count.

    Returns
    -------
    pandas.DataFrame
        One float column per confound, one row per volume (``n/a`` read as NaN).

    Raises
    ------
    InvalidInputError
        Not a regular file, too large, empty, not a TSV, non-numeric or infinite values, or
        a row count other than ``n_volumes``.
    """
    path = Path(path)
    expected = "an fMRIPrep desc-confounds_timeseries.tsv"
    raw = _read_capped(path, "Confounds file", expected, MAX_TABLE_BYTES)
    label = f"Confounds file {path.name!r}"
    if not raw.strip():
        raise InvalidInputError(f"{label} is empty.")
    import pandas as pd

    try:
        df = pd.read_csv(io.BytesIO(raw), sep="\t", na_values=["n/a", "N/A", "NaN", "nan"],
                         encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidInputError(
            f"{label} is not a tab-separated table ({_one_line(exc)}); expected {expected}."
        ) from None
    return _check_confounds(df, label, n_volumes)


def _is_real(value) -> bool:
    """A real number that is not a bool (JSON ``true`` loads as a Python int subclass)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _as_json(value) -> str:
    """A sidecar value as it is written in JSON (``true``, ``"2.0"``), on one line."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _as_float(value) -> float:
    try:
        return float(value)
    except OverflowError:  # a JSON integer with hundreds of digits
        return math.inf


def _resolve_tr(header_tr: float | None, sidecar: dict, tr: float | None, name: str, warn: list):
    side_tr = sidecar.get("RepetitionTime")
    if side_tr is not None:
        if not _is_real(side_tr):
            raise InvalidInputError(
                f"The sidecar's RepetitionTime is {_as_json(side_tr)}; expected a number of "
                "seconds written as a JSON number such as 2.0, not a string or true/false "
                f"(sidecar of {name!r})."
            )
        side_tr = _as_float(side_tr)
    if tr is not None:
        value, origin = _as_float(tr), "the tr argument"
    elif side_tr is not None:
        value, origin = side_tr, "the JSON sidecar"
        if header_tr and abs(header_tr - side_tr) > _TR_TOLERANCE * side_tr:
            msg = (
                f"TR disagreement: the NIfTI header says {header_tr:g} s, the sidecar says "
                f"{side_tr:g} s; using the sidecar."
            )
            warn.append(msg)
            warnings.warn(msg, FMMTCWarning, stacklevel=3)
    elif header_tr:
        value, origin = header_tr, "the NIfTI header"
    else:
        raise InvalidInputError(
            f"The repetition time (TR) of {_shown(name)} is missing: give a BIDS JSON sidecar with "
            '"RepetitionTime" (seconds) or a NIfTI header with pixdim[4] set.'
        )
    if not np.isfinite(value) or value <= 0:
        raise InvalidInputError(
            f"The repetition time (TR) from {origin} is {value:g} s; expected a positive number "
            "of seconds."
        )
    lo, hi = TR_RANGE_S
    if not lo <= value <= hi:
        raise InvalidInputError(
            f"The repetition time (TR) from {origin} is {value:g} s, which is implausible for "
            f"rs-fMRI; expected {lo:g} to {hi:g} s (is it in milliseconds?)."
        )
    return value


# --------------------------------------------------------------------------------------------
# Content sniffing
# --------------------------------------------------------------------------------------------
_SCAN_EXPECTED = "a 4D NIfTI (.nii/.nii.gz) or a region time-series table (TSV/CSV/NPY)"


def _sniff(path: Path) -> tuple[str, bytes, bool]:
    """Return (kind, first content bytes, gzip?); kind in nifti1/nifti2/npy/text/binary."""
    with _open_regular(path, "Scan file", _SCAN_EXPECTED) as f:
        head = f.read(1024)
    if not head:
        raise InvalidInputError(
            f"{_shown(path.name)} is empty (0 bytes); expected a 4D NIfTI or a table."
        )
    compressed = head[:2] == _GZIP_MAGIC
    if compressed:
        try:
            with _gzip.open(path, "rb") as f:
                head = f.read(1024)
        except _GZIP_ERRORS as exc:
            raise InvalidInputError(
                f"{_shown(path.name)} is a truncated or corrupt gzip file ({_one_line(exc)}); "
                "re-export or re-copy the scan."
            ) from None
        if not head:
            raise InvalidInputError(
                f"{_shown(path.name)} decompresses to nothing; expected a 4D NIfTI."
            )
    kind = "binary"
    if len(head) >= 348 and head[344:348] in _NIFTI1_MAGICS:
        kind = "nifti1"
    elif len(head) >= 540 and head[4:8] in _NIFTI2_MAGICS:
        kind = "nifti2"
    elif head.startswith(_NPY_MAGIC):
        kind = "npy"
    else:
        try:
            head.decode("utf-8")
            kind = "text"
        except UnicodeDecodeError:
            # A text file cut in the middle of a multi-byte character is still text.
            try:
                head[:-4].decode("utf-8")
                kind = "text"
            except UnicodeDecodeError:
                kind = "binary"
    if compressed and kind not in ("nifti1", "nifti2"):
        kind = "gzip-other"
    return kind, head, compressed


@fill_doc
def load_scan(
    path: str | os.PathLike,
    *,
    sidecar: str | os.PathLike | dict | None = None,
    confounds: str | os.PathLike | pd.DataFrame | None = None,
    atlas=None,
    tr: float | None = None,
    min_volumes: int = DEFAULT_MIN_VOLUMES,
    max_bytes: int | None = None,
) -> Scan:
    """Load and validate a scan without reading its voxels.

    Parameters
    ----------
    path : str or path
        A 4D NIfTI-1/2 (``.nii``, ``.nii.gz``; float or scaled integer data) in MNI space, or a
        region time-series table (TSV/CSV with a header of region names, or ``.npy``), one row
        per volume.
    %(sidecar)s
    %(confounds)s
    atlas : str, path, Atlas or None, default=None
        Atlas of a table that does not name one (by the sidecar's ``Atlas`` or the file name's
        ``seg-<name>`` entity); a table naming another atlas is refused. Ignored for NIfTI
        scans (the atlas is chosen at parcellation).
    tr : float or None, default=None
        Repetition time in seconds, overriding header and sidecar.
    min_volumes : int, default=50
        Fewest volumes accepted.
    max_bytes : int or None, default=None
        Largest decompressed voxel payload accepted (default ``$FMMTC_MAX_SCAN_BYTES`` or 8 GiB);
        for a ``.npy`` table, the size of the table as float64.

    Returns
    -------
    Scan

    Raises
    ------
    InvalidInputError
        With a specific message for each kind of bad input.
    """
    path = Path(path)
    min_volumes = _check_positive_int(
        "min_volumes", min_volumes, "the fewest volumes accepted, default 50", "--min-volumes"
    )
    budget = _memory_budget(max_bytes)
    if tr is not None and not _is_real(tr):
        raise InvalidInputError(
            f"Invalid value for the 'tr' parameter: expected a number of seconds, but got "
            f"{tr!r} instead."
        )
    if not path.exists():
        if os.path.lexists(path):
            raise InvalidInputError(
                f"Scan file {str(path)!r} is a broken symbolic link; expected {_SCAN_EXPECTED}."
            )
        raise InvalidInputError(f"Scan file {_shown(path)} does not exist.")
    if path.is_dir():
        raise InvalidInputError(f"{_shown(path)} is a folder; expected a 4D NIfTI file or a table.")
    # Before any open: a named pipe would block the sniff forever, a device never ends.
    _check_regular_file(path, "Scan file", _SCAN_EXPECTED)
    warn: list[str] = []
    if isinstance(sidecar, dict):
        side = dict(sidecar)
    elif sidecar is not None:
        side = load_sidecar(sidecar)
    else:
        found = find_sidecar(path)
        side = load_sidecar(found) if found else {}

    kind, head, compressed = _sniff(path)
    claims_nifti = path.name.lower().endswith((".nii", ".nii.gz"))
    if claims_nifti and kind not in ("nifti1", "nifti2", "gzip-other"):
        raise InvalidInputError(
            f"{_shown(path.name)} is not a NIfTI image (wrong magic number); expected a 4D "
            "NIfTI-1 or NIfTI-2 file."
        )
    if kind in ("nifti1", "nifti2"):
        scan = _load_nifti(path, kind, head, compressed, side, tr, min_volumes, budget, warn)
    elif kind in ("npy", "text"):
        scan = _load_table(path, kind, side, atlas, tr, min_volumes, budget, warn)
    elif kind == "gzip-other":
        raise InvalidInputError(
            f"{_shown(path.name)} is gzip-compressed but does not hold a NIfTI image (no NIfTI "
            "magic number); expected a 4D .nii.gz."
        )
    else:
        raise InvalidInputError(
            f"{_shown(path.name)} is not a NIfTI image (wrong magic number) nor a region "
            "time-series table; expected a 4D .nii/.nii.gz or a TSV/CSV/NPY table."
        )
    if confounds is not None:
        import pandas as pd

        if isinstance(confounds, pd.DataFrame):
            df = confounds.reset_index(drop=True)
            scan.confounds = _check_confounds(df, "The confounds table", scan.n_volumes)
        else:
            scan.confounds = load_confounds_table(confounds, scan.n_volumes)
    return scan


def _load_nifti(path, kind, head, compressed, side, tr, min_volumes, budget, warn) -> Scan:
    name = _shown(path.name)
    if head[344:348] == b"ni1\x00" or head[4:8] == b"ni2\x00":
        raise InvalidInputError(
            f"{name} is the header of a NIfTI pair (.hdr/.img); convert it to a single .nii or "
            ".nii.gz file."
        )
    try:
        header = _parse_nifti_header(head, kind)
    except Exception as exc:  # nibabel raises a variety of types on garbage
        raise InvalidInputError(
            f"{name} has an unreadable NIfTI header ({_one_line(exc)})."
        ) from None
    dims = [int(d) for d in header["dim"]]
    ndim = dims[0]
    shape = tuple(dims[1 : 1 + ndim]) if 1 <= ndim <= 7 else ()
    if not shape or any(d < 1 for d in shape):
        raise InvalidInputError(f"{name} has an invalid NIfTI header: dimensions {dims}.")
    _check_nifti_header(header, repr(path.name))
    if len(shape) < 4 or (len(shape) >= 4 and shape[3] == 1 and all(d == 1 for d in shape[4:])):
        raise InvalidInputError(
            f"{name} is a 3D image (shape {shape[:3]}); expected a 4D rs-fMRI time series "
            "(x, y, z, time)."
        )
    if any(d != 1 for d in shape[4:]):
        raise InvalidInputError(
            f"{name} has {len(shape)} dimensions (shape {shape}); expected a 4D time series."
        )
    spatial, n_vol = shape[:3], shape[3]
    try:
        dtype = header.get_data_dtype()
    except Exception:
        raise InvalidInputError(
            f"{name} declares an unsupported NIfTI data type code {int(header['datatype'])}."
        ) from None
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise InvalidInputError(
            f"{name} stores voxels as {dtype}; expected integer or floating-point data."
        )
    # Memory budget: decided from the header alone, before any voxel is read.
    declared = int(np.prod(shape[:4], dtype=np.float64)) * dtype.itemsize
    if declared > budget:
        raise InvalidInputError(
            f"{name} declares {declared / 1024**3:.1f} GiB of voxel data (shape {shape[:4]}, "
            f"{dtype}), over the {budget / 1024**3:.1f} GiB limit; check the file or raise "
            "FMMTC_MAX_SCAN_BYTES."
        )
    if n_vol < min_volumes:
        raise InvalidInputError(
            f"{name} has {n_vol} volumes; at least {min_volumes} are needed for a reliable "
            "connectivity estimate."
        )
    offset = int(header.get_data_offset())
    if not compressed:
        size = path.stat().st_size
        if offset + declared > size:
            raise InvalidInputError(
                f"{name} is truncated: the header declares {offset + declared} bytes but the "
                f"file holds {size}."
            )
    try:
        affine = header.get_best_affine()
    except Exception:  # nibabel refuses some malformed qform/sform fields
        affine = np.full((4, 4), np.nan)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise InvalidInputError(f"{name} has an invalid (singular) voxel-to-world affine.")
    space_known = int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0
    if not space_known:
        msg = space_unknown_message(path)
        warn.append(msg)
        warnings.warn(msg, FMMTCWarning, stacklevel=3)
    zooms = header.get_zooms()
    header_tr = float(zooms[3]) if len(zooms) > 3 else 0.0
    t_unit = header.get_xyzt_units()[1]
    if t_unit == "msec":
        header_tr /= 1000.0
    elif t_unit == "usec":
        header_tr /= 1e6
    tr_s = _resolve_tr(header_tr if header_tr > 0 else None, side, tr, path.name, warn)
    # Checked above: a slope of 0 or NaN means unscaled; a real slope has a finite intercept.
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if not np.isfinite(slope) or slope == 0:
        slope, inter = 1.0, 0.0
    return Scan(
        path=path,
        kind="nifti",
        n_volumes=n_vol,
        tr=tr_s,
        spatial_shape=cast("tuple[int, int, int]", tuple(spatial)),  # 3 dims, checked above
        affine=np.asarray(affine, dtype=np.float64),
        sidecar=side,
        warnings=warn,
        space_known=space_known,
        _dtype=dtype,
        _offset=offset,
        _slope=slope,
        _inter=inter,
        _compressed=compressed,
    )


_SEG_ENTITY = re.compile(r"(?:^|_)(?:seg|atlas)-([A-Za-z0-9]+)(?:_|$)")


def _table_atlas_name(path: Path, side: dict, atlas) -> Any:
    """The table's atlas: named by the file (sidecar ``Atlas``, ``seg-`` entity) or by ``atlas``."""
    named = side.get("Atlas")
    if named is not None and not isinstance(named, str):
        raise InvalidInputError(
            f"The sidecar's Atlas is {named!r} (for {path.name!r}); expected a string: a bundled "
            "atlas name (hcpex, aal3) or the path of a NIfTI label image."
        )
    if not named:
        m = _SEG_ENTITY.search(_strip_ext(path))
        named = m.group(1) if m else None
    if named and atlas is not None:
        from fmmtc_core.atlas import load_atlas

        if load_atlas(named) is not load_atlas(atlas):
            raise InvalidInputError(
                f"{_shown(path.name)} holds {load_atlas(named).name} region series, but atlas "
                f"{load_atlas(atlas).name} was requested; choose {load_atlas(named).name}."
            )
    if named:
        return named
    if atlas is not None:
        return atlas
    raise InvalidInputError(
        f"Cannot tell which atlas the columns of {_shown(path.name)} follow: add \"Atlas\" to "
        "its JSON sidecar or a seg-<name> entity to its file name "
        "(e.g. sub-01_seg-HCPEx_timeseries.tsv)."
    )


def _read_text_table(path: Path) -> tuple[list[str] | None, np.ndarray]:
    # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name.
    raw = _read_capped(path, "Table", "a region time-series table (TSV/CSV)", MAX_TABLE_BYTES)
    text = raw.decode("utf-8-sig", errors="strict")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise InvalidInputError(f"{_shown(path.name)} holds no rows; expected one row per volume.")
    first = lines[0]
    delim: str | None = "\t" if first.count("\t") >= max(first.count(","), 1) else ","
    if delim == "," and first.count(",") == 0:
        delim = None  # whitespace-separated single column or plain numbers
    rows = list(csv.reader(lines, delimiter=delim)) if delim else [ln.split() for ln in lines]

    def _is_num(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return s.strip().lower() in ("n/a", "nan", "")

    header = None
    if not all(_is_num(c) for c in rows[0]):
        header = [c.strip() for c in rows[0]]
        rows = rows[1:]
    if not rows:
        raise InvalidInputError(f"{_shown(path.name)} has a header but no data rows.")
    width = len(header) if header else len(rows[0])
    out = np.empty((len(rows), width), dtype=np.float64)
    for i, row in enumerate(rows):
        if len(row) != width:
            raise InvalidInputError(
                f"{_shown(path.name)}, data row {i + 1} has {len(row)} cells; expected {width}."
            )
        for j, cell in enumerate(row):
            c = cell.strip()
            try:
                out[i, j] = np.nan if c.lower() in ("n/a", "nan", "") else float(c)
            except ValueError:
                col = header[j] if header else f"#{j + 1}"
                raise InvalidInputError(
                    f"{_shown(path.name)}, data row {i + 1}, column {col!r} holds {c!r}; expected "
                    "numbers (or n/a)."
                ) from None
    return header, out


def _check_npy_header(path: Path, name: str, budget: int) -> None:
    """Refuse a ``.npy`` from its header: object or non-numeric dtype, not 2D, over the memory
    budget (as float64), or shorter than the data its header declares."""
    fmt = np.lib.format
    with _open_regular(path, "Scan file", _SCAN_EXPECTED) as f:
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"format version {version[0]}.{version[1]} is not supported")
        except (ValueError, EOFError, OSError) as exc:
            raise InvalidInputError(
                f"{name} is not a plain numeric .npy array ({_one_line(exc)}); expected a 2D "
                "table of volumes x regions saved with numpy.save."
            ) from None
        data_start = f.tell()
    if dtype.hasobject:
        raise InvalidInputError(
            f"{name} is not a plain numeric .npy array (dtype {dtype}); object arrays are "
            "refused because loading them would run code."
        )
    if dtype.kind not in "iuf":
        raise InvalidInputError(f"{name} holds {dtype} values; expected numbers.")
    if len(shape) != 2:
        raise InvalidInputError(
            f"{name} has shape {shape}; expected a 2D table of volumes x regions."
        )
    n = math.prod(int(d) for d in shape)
    if n * 8 > budget:
        raise InvalidInputError(
            f"{name} declares a {shape[0]} x {shape[1]} table ({_size(n * 8)} as float64), over "
            f"the {_size(budget)} limit; check the file or raise FMMTC_MAX_SCAN_BYTES."
        )
    have = path.stat().st_size
    if data_start + n * dtype.itemsize > have:
        raise InvalidInputError(
            f"{name} is truncated: its header declares {data_start + n * dtype.itemsize} bytes "
            f"but the file holds {have}."
        )


def _load_table(path, kind, side, atlas, tr, min_volumes, budget, warn) -> Scan:
    from fmmtc_core.atlas import load_atlas

    name = _shown(path.name)
    if kind == "npy":
        _check_npy_header(path, repr(path.name), budget)
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise InvalidInputError(
                f"{name} is not a plain numeric .npy array ({exc}); object arrays are refused "
                "because loading them would run code."
            ) from None
        except (OSError, EOFError) as exc:
            raise InvalidInputError(
                f"{name} is a truncated or corrupt .npy file ({_one_line(exc)})."
            ) from None
        if arr.dtype.kind not in "iuf":
            raise InvalidInputError(f"{name} holds {arr.dtype} values; expected numbers.")
        if arr.ndim != 2:
            raise InvalidInputError(
                f"{name} has shape {arr.shape}; expected a 2D table of volumes x regions."
            )
        header, data = None, np.asarray(arr, dtype=np.float64)
    else:
        try:
            header, data = _read_text_table(path)
        except UnicodeDecodeError:
            raise InvalidInputError(
                f"{name} is not UTF-8 text; expected a TSV/CSV table."
            ) from None
    atlas_obj = load_atlas(_table_atlas_name(path, side, atlas))
    n_regions = atlas_obj.n_regions
    if header is not None:
        known = {n: i for i, n in enumerate(atlas_obj.names)}
        unknown = [h for h in header if h not in known]
        if unknown or len(header) != n_regions or len(set(header)) != len(header):
            missing = [n for n in atlas_obj.names if n not in set(header)]
            detail = []
            if unknown:
                detail.append(f"not in the atlas: {unknown[:3]}")
            if missing:
                detail.append(f"missing: {missing[:3]}")
            raise InvalidInputError(
                f"The columns of {name} do not match atlas {atlas_obj.name}: {len(header)} "
                f"columns for {n_regions} regions ({'; '.join(detail) or 'duplicated names'}). "
                "Expected one column per region, headed by the atlas's region names."
            )
        order = [header.index(n) for n in atlas_obj.names]
        data = data[:, order]
    elif data.shape[1] != n_regions:
        hint = ""
        if data.shape[0] == n_regions:
            hint = " It looks transposed: expected one row per volume, one column per region."
        raise InvalidInputError(
            f"{name} has {data.shape[1]} columns but atlas {atlas_obj.name} has {n_regions} "
            f"regions.{hint}"
        )
    if data.shape[0] < min_volumes:
        raise InvalidInputError(
            f"{name} has {data.shape[0]} volumes; at least {min_volumes} are needed for a "
            "reliable connectivity estimate."
        )
    finite = np.isfinite(data)
    if not finite.any():
        raise InvalidInputError(f"{name} holds only NaN values; expected region time series.")
    if np.isinf(data).any():
        row, col = (int(v[0]) for v in np.nonzero(np.isinf(data)))
        raise InvalidInputError(
            f"{name} holds infinite values (first in column {atlas_obj.names[col]!r}, data row "
            f"{row + 1}); expected finite numbers or n/a."
        )
    if np.nanmax(np.abs(data)) == 0:
        raise InvalidInputError(f"{name} holds only zeros; expected region time series.")
    if np.all(np.nanstd(data[:, finite.any(axis=0)], axis=0) == 0):
        raise InvalidInputError(f"{name} is constant over time in every region; expected signals.")
    empty = np.flatnonzero(~finite.any(axis=0))
    if empty.size:
        warn.append(
            f"{empty.size} region(s) have no values (n/a), e.g. {atlas_obj.names[empty[0]]}; "
            "they are treated as not covered."
        )
    partial = (~finite).any(axis=0) & finite.any(axis=0)
    if partial.any():
        warn.append(f"{int(partial.sum())} region(s) have missing values at some volumes.")
    for w in warn:
        warnings.warn(w, FMMTCWarning, stacklevel=3)
    tr_s = _resolve_tr(None, side, tr, path.name, warn)
    atlas_key = atlas_obj.source if atlas_obj.name not in ("HCPEx", "AAL3") else atlas_obj.name
    return Scan(
        path=path,
        kind="table",
        n_volumes=int(data.shape[0]),
        tr=tr_s,
        table=data,
        atlas_name=atlas_key,
        sidecar=side,
        warnings=warn,
    )
