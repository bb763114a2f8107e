"""Hostile and malformed inputs: each is a clean, one-line refusal raised before any big read.

Covers: non-regular files (named pipes, devices) for every file the loaders open, size caps of
side files, header-first memory budgets (NIfTI, ``.npy``, label atlases), malformed NIfTI header
fields, hostile sidecar JSON, option validation (``min_volumes``, explain tolerances), and
messages that used to blame the wrong thing (byte-order marks, infinite confounds). The CLI
checks run ``fmmtc qc`` / ``fmmtc parcellate``, which load no model.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import struct
import threading
import tracemalloc

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import GRID_AFFINE, fmriprep_confounds, save_nifti

from fmmtc_core import InvalidInputError
from fmmtc_core._errors import FMMTCWarning
from fmmtc_core.atlas import load_atlas
from fmmtc_core.io import (
    MAX_JSON_DEPTH,
    MAX_LABEL_TABLE_BYTES,
    MAX_SIDECAR_BYTES,
    MAX_TABLE_BYTES,
    load_confounds_table,
    load_scan,
    load_sidecar,
)

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
needs_dev_zero = pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")

SIDE = {"RepetitionTime": 2.0}
# Byte offsets of NIfTI-1 header fields.
VOX_OFFSET, SCL_SLOPE, SCL_INTER = 108, 112, 116
QFORM_CODE, SFORM_CODE, QUATERN_B = 252, 254, 256


def bounded(fn, *args, unblock=(), timeout=60.0, **kwargs):
    """Call ``fn`` in a thread and fail (instead of hanging the suite) if it blocks.

    A reader stuck on a named pipe in ``unblock`` is released by opening the pipe for writing,
    so no thread outlives the test.
    """
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        for fifo in unblock:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        worker.join(5)
        pytest.fail(f"{getattr(fn, '__name__', fn)} blocked for {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def small_nifti(path, n_volumes=60, **fields):
    """A valid 4x4x4xT float32 .nii (sform code 4, TR 2 s) with raw header fields patched.

    ``fields`` are ``name=(offset, struct format, value)`` written little-endian in place.
    """
    data = np.random.default_rng(0).standard_normal((4, 4, 4, n_volumes)).astype(np.float32)
    save_nifti(path, data + 100.0)
    raw = bytearray(path.read_bytes())
    for offset, fmt, value in fields.values():
        struct.pack_into("<" + fmt, raw, offset, value)
    path.write_bytes(bytes(raw))
    return path


def sparse_file(path, size):
    """A file whose size is ``size`` bytes without writing them (a sparse file)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def cli(capsys, *argv):
    from fmmtc_core.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse-level refusals (same `error:` contract)
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_error_line(err: str) -> str:
    assert err.startswith("error: "), err
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    return err


# ---- 1. only regular files --------------------------------------------------------------------
@needs_fifo
def test_fifo_scan_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "sub-01_bold.nii.gz"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInputError, match=r"Scan file '.*sub-01_bold\.nii\.gz' is not a "
                                                r"regular file \(it is a named pipe \(FIFO\)\)"):
        bounded(load_scan, fifo, unblock=[fifo])


@needs_fifo
@pytest.mark.parametrize(
    ("role", "match"),
    [
        ("sidecar", r"Sidecar '.*side\.json' is not a regular file \(it is a named pipe"),
        ("confounds", r"Confounds file '.*conf\.tsv' is not a regular file \(it is a named pipe"),
        ("atlas", r"Atlas file '.*lab\.nii' is not a regular file \(it is a named pipe"),
    ],
)
def test_fifo_side_files_are_refused_without_blocking(tmp_path, role, match):
    scan = small_nifti(tmp_path / "s.nii")
    fifo = tmp_path / {"sidecar": "side.json", "confounds": "conf.tsv", "atlas": "lab.nii"}[role]
    os.mkfifo(fifo)
    with pytest.raises(InvalidInputError, match=match):
        if role == "atlas":
            bounded(load_atlas, fifo, unblock=[fifo])
        else:
            bounded(load_scan, scan, unblock=[fifo], **{role: fifo})


@needs_fifo
def test_fifo_posing_as_the_sidecar_beside_the_scan_is_refused(tmp_path):
    scan = small_nifti(tmp_path / "sub-01_bold.nii")
    os.mkfifo(tmp_path / "sub-01_bold.json")
    with pytest.raises(InvalidInputError, match=r"Sidecar '.*sub-01_bold\.json' is not a regular"):
        bounded(load_scan, scan, unblock=[tmp_path / "sub-01_bold.json"])


@needs_fifo
def test_fifo_label_table_is_refused_without_blocking(tmp_path):
    atlas = _label_image(tmp_path / "lab.nii.gz")
    fifo = tmp_path / "names.txt"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInputError,
                       match=r"Label table '.*names\.txt' is not a regular file"):
        bounded(load_atlas, atlas, labels_file=fifo, unblock=[fifo])


@needs_dev_zero
@pytest.mark.parametrize(
    ("role", "match"),
    [
        ("scan", r"Scan file '/dev/zero' is not a regular file \(it is a character device\)"),
        ("sidecar", r"Sidecar '/dev/zero' is not a regular file \(it is a character device\); "
                    r"expected a BIDS JSON sidecar"),
        ("confounds", r"Confounds file '/dev/zero' is not a regular file .* expected an fMRIPrep"),
    ],
)
def test_device_is_refused_before_reading(tmp_path, role, match):
    scan = small_nifti(tmp_path / "s.nii")
    kwargs = {} if role == "scan" else {role: "/dev/zero"}
    with pytest.raises(InvalidInputError, match=match):
        bounded(load_scan, "/dev/zero" if role == "scan" else scan, **kwargs)


@needs_dev_zero
def test_device_as_atlas_or_label_table_is_refused(tmp_path):
    with pytest.raises(InvalidInputError, match=r"Atlas file '/dev/zero' is not a regular file"):
        bounded(load_atlas, "/dev/zero")
    atlas = _label_image(tmp_path / "lab.nii.gz")
    with pytest.raises(InvalidInputError, match=r"Label table '/dev/zero' is not a regular file"):
        bounded(load_atlas, atlas, labels_file="/dev/zero")


# ---- 2. size caps and header-first budgets ----------------------------------------------------
def test_size_caps_are_documented_constants():
    assert MAX_SIDECAR_BYTES == 1024**2
    assert MAX_TABLE_BYTES == 64 * 1024**2
    assert MAX_LABEL_TABLE_BYTES == 16 * 1024**2
    assert MAX_JSON_DEPTH == 20


def test_oversized_sidecar_is_refused_before_reading(tmp_path):
    side = sparse_file(tmp_path / "big.json", MAX_SIDECAR_BYTES + 1)
    with pytest.raises(InvalidInputError, match=r"Sidecar '.*big\.json' is 1\.0 MiB \(1048577 "
                                                r"bytes\), over the 1\.0 MiB limit .* expected "
                                                r"a BIDS JSON"):
        load_sidecar(side)


def test_oversized_confounds_are_refused_before_reading(tmp_path):
    conf = sparse_file(tmp_path / "conf.tsv", MAX_TABLE_BYTES + 1)
    with pytest.raises(InvalidInputError, match=r"Confounds file '.*conf\.tsv' is 64\.0 MiB "
                                                r"\(67108865 bytes\), over the 64\.0 MiB limit"):
        load_confounds_table(conf, 60)


def test_oversized_region_table_is_refused_before_reading(tmp_path):
    table = sparse_file(tmp_path / "t_seg-aal3.tsv", MAX_TABLE_BYTES + 1)
    with pytest.raises(InvalidInputError, match=r"Table '.*t_seg-aal3\.tsv' is 64\.0 MiB "
                                                r"\(67108865 bytes\), over"):
        load_scan(table, sidecar=SIDE)


def test_oversized_label_table_is_refused_before_reading(tmp_path):
    atlas = _label_image(tmp_path / "lab.nii.gz")
    names = sparse_file(tmp_path / "names.txt", MAX_LABEL_TABLE_BYTES + 1)
    with pytest.raises(InvalidInputError, match=r"Label table '.*names\.txt' is 16\.0 MiB "
                                                r"\(16777217 bytes\), over"):
        load_atlas(atlas, labels_file=names)


def _label_image(path, shape=(10, 12, 10)):
    data = np.zeros(shape, dtype=np.int16)
    data[1:4, 2:10, 2:8] = 3
    data[6:9, 2:10, 2:8] = 7
    affine = np.array([[8.0, 0, 0, -40], [0, 8, 0, -50], [0, 0, 8, -30], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _bomb_atlas(path, shape):
    """A tiny .nii.gz whose header declares ``shape`` int16 labels (no data follow)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape(shape)
    hdr.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=4)
    with gzip.open(path, "wb") as f:
        hdr.write_to(f)
        f.write(b"\x00" * 4096)
    return path


def test_gzip_bomb_atlas_is_refused_from_its_header(tmp_path):
    path = _bomb_atlas(tmp_path / "bomb.nii.gz", (4000, 4000, 4000))
    assert path.stat().st_size < 4096
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInputError, match=r"Atlas file 'bomb\.nii\.gz' declares a "
                                                    r"4000x4000x4000 image \(476\.8 GiB as "
                                                    r"float64\), over the 8\.0 GiB limit"):
            load_atlas(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024**2


def test_atlas_budget_is_the_scan_budget(tmp_path, monkeypatch):
    path = _label_image(tmp_path / "small.nii.gz")
    monkeypatch.setenv("FMMTC_MAX_SCAN_BYTES", "1000")
    with pytest.raises(InvalidInputError, match=r"declares a 10x12x10 image .* over the 1000 "
                                                r"bytes limit; .* raise FMMTC_MAX_SCAN_BYTES"):
        load_atlas(path)
    monkeypatch.setenv("FMMTC_MAX_SCAN_BYTES", "lots")
    with pytest.raises(InvalidInputError, match=r"FMMTC_MAX_SCAN_BYTES is 'lots'; expected a "
                                                r"positive number of bytes"):
        load_atlas(path)


def test_truncated_uncompressed_atlas_is_refused_before_reading(tmp_path):
    path = _label_image(tmp_path / "cut.nii")
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(InvalidInputError, match=r"Atlas file 'cut\.nii' is truncated: its header "
                                                r"declares 2752 bytes but the file holds 2652"):
        load_atlas(path)


def test_truncated_gzip_atlas_is_a_clean_refusal(tmp_path):
    path = _bomb_atlas(tmp_path / "short.nii.gz", (64, 64, 64))
    with pytest.raises(InvalidInputError, match=r"Atlas file 'short\.nii\.gz' could not be read "
                                                r"\(.*\); it is truncated or corrupt"):
        load_atlas(path)


def _npy_header_only(path, shape, dtype="<f8"):
    """A .npy holding only a header that declares ``shape`` (the data are missing)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": dtype, "fortran_order": False, "shape": shape}
        )
    return path


def test_npy_over_budget_is_refused_from_its_header(tmp_path):
    path = _npy_header_only(tmp_path / "huge.npy", (10**9, 166))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInputError, match=r"'huge\.npy' declares a 1000000000 x 166 "
                                                    r"table \(1236\.8 GiB as float64\), over "
                                                    r"the 8\.0 GiB limit"):
            load_scan(path, sidecar={"RepetitionTime": 2.0, "Atlas": "aal3"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024**2


def test_npy_shorter_than_its_header_is_refused_before_reading(tmp_path):
    path = _npy_header_only(tmp_path / "short.npy", (60, 166))
    with pytest.raises(InvalidInputError, match=r"'short\.npy' is truncated: its header declares "
                                                r"79808 bytes but the file holds 128"):
        load_scan(path, sidecar={"RepetitionTime": 2.0, "Atlas": "aal3"})


def test_npy_object_and_text_dtypes_are_refused_from_the_header(tmp_path):
    path = _npy_header_only(tmp_path / "o.npy", (60, 166), dtype="|O")
    with pytest.raises(InvalidInputError, match="object arrays are refused"):
        load_scan(path, sidecar={"RepetitionTime": 2.0, "Atlas": "aal3"})
    path = _npy_header_only(tmp_path / "u.npy", (60, 166), dtype="<U3")
    with pytest.raises(InvalidInputError, match=r"'u\.npy' holds <U3 values; expected numbers"):
        load_scan(path, sidecar={"RepetitionTime": 2.0, "Atlas": "aal3"})


# ---- 3. NIfTI header fields -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "shown"),
    [(math.nan, "nan"), (-352.0, "-352"), (math.inf, "inf"), (100.0, "100"), (352.5, "352.5"),
     (0.0, "0")],
)
def test_bad_vox_offset_is_refused_from_the_header(tmp_path, value, shown):
    path = small_nifti(tmp_path / "v.nii", off=(VOX_OFFSET, "f", value))
    with pytest.raises(InvalidInputError, match=rf"'v\.nii' has an invalid NIfTI header: "
                                                rf"vox_offset is {shown}; expected a whole number "
                                                r">= 352"):
        load_scan(path)


@pytest.mark.parametrize(
    ("slope", "inter", "match"),
    [
        (math.inf, 0.0, r"scl_slope is inf; expected a finite number \(a slope of 0 or NaN means "
                        r"unscaled data\)"),
        (-math.inf, 0.0, r"scl_slope is -inf; expected a finite number"),
        (1.0, math.inf, r"scl_inter is inf; expected a finite number"),
        (0.0, -math.inf, r"scl_inter is -inf; expected a finite number"),
        (2.0, math.nan, r"scl_inter is NaN while scl_slope is 2; expected a finite intercept"),
    ],
)
def test_bad_scaling_is_refused_from_the_header(tmp_path, slope, inter, match):
    path = small_nifti(tmp_path / "s.nii", s=(SCL_SLOPE, "f", slope), i=(SCL_INTER, "f", inter))
    with pytest.raises(InvalidInputError, match=r"'s\.nii' has an invalid NIfTI header: " + match):
        load_scan(path)


@pytest.mark.parametrize(("slope", "inter"), [(math.nan, math.nan), (0.0, 5.0), (math.nan, 1.0)])
def test_slope_zero_or_nan_means_unscaled(tmp_path, slope, inter):
    path = small_nifti(tmp_path / "u.nii", s=(SCL_SLOPE, "f", slope), i=(SCL_INTER, "f", inter))
    assert load_scan(path).scale == (1.0, 0.0)


def test_non_unit_quaternion_is_refused_when_the_qform_is_set(tmp_path):
    bcd = dict(b=(QUATERN_B, "f", 0.8), c=(QUATERN_B + 4, "f", 0.8), d=(QUATERN_B + 8, "f", 0.8))
    path = small_nifti(tmp_path / "q.nii", code=(QFORM_CODE, "h", 1), **bcd)
    with pytest.raises(InvalidInputError, match=r"'q\.nii' has an invalid NIfTI header: the "
                                                r"qform quaternion \(b, c, d\) = \(0\.8, 0\.8, "
                                                r"0\.8\) has b\^2\+c\^2\+d\^2 = 1\.92; "
                                                r"expected at most 1"):
        load_scan(path)
    # Unused (qform_code 0): the sform alone places the grid.
    path = small_nifti(tmp_path / "q0.nii", code=(QFORM_CODE, "h", 0), **bcd)
    np.testing.assert_allclose(load_scan(path).affine, GRID_AFFINE)


def test_no_orientation_warns_that_the_space_is_unknown(tmp_path):
    path = small_nifti(tmp_path / "o.nii", q=(QFORM_CODE, "h", 0), s=(SFORM_CODE, "h", 0))
    with pytest.warns(FMMTCWarning, match=r"'o\.nii' has no orientation in its NIfTI header "
                                          r"\(qform_code and sform_code are both 0\), so its "
                                          r"space is unknown"):
        scan = load_scan(path)
    assert scan.space_known is False
    assert any("space is unknown" in w for w in scan.warnings)
    assert load_scan(small_nifti(tmp_path / "ok.nii")).space_known is True


def test_atlas_header_fields_are_checked_before_nibabel(tmp_path):
    path = _label_image(tmp_path / "a.nii")
    raw = bytearray(path.read_bytes())
    struct.pack_into("<f", raw, VOX_OFFSET, math.nan)
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidInputError, match=r"Atlas file 'a\.nii' has an invalid NIfTI header: "
                                                r"vox_offset is nan"):
        load_atlas(path)
    path = _label_image(tmp_path / "b.nii")
    raw = bytearray(path.read_bytes())
    struct.pack_into("<ff", raw, SCL_SLOPE, 1.0, math.inf)
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidInputError, match=r"Atlas file 'b\.nii' has an invalid NIfTI header: "
                                                r"scl_inter is inf"):
        load_atlas(path)


# ---- 4. sidecar JSON --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[" * 100_000, r"nests JSON arrays/objects 100000 levels deep; expected at most 20"),
        ('{"a": ' * 30 + "1" + "}" * 30, r"nests JSON arrays/objects 30 levels deep"),
        ('{"RepetitionTime": ' + "1" * 5000 + "}", r"is not valid JSON \(.*digits"),
    ],
)
def test_hostile_sidecar_json_is_a_clean_refusal(tmp_path, text, match):
    side = tmp_path / "side.json"
    side.write_text(text)
    with pytest.raises(InvalidInputError, match=r"Sidecar '?side\.json'? " + match):
        load_sidecar(side)


def test_brackets_inside_json_strings_do_not_count_as_nesting(tmp_path):
    side = tmp_path / "side.json"
    side.write_text(json.dumps({"RepetitionTime": 2.0, "Note": "[" * 500 + '\\"{' * 50}))
    assert load_sidecar(side)["RepetitionTime"] == 2.0


@pytest.mark.parametrize("value", [True, False, "2.0", [2.0], {"s": 2}])
def test_repetition_time_must_be_a_json_number(tmp_path, value):
    path = small_nifti(tmp_path / "tr.nii")
    (tmp_path / "tr.json").write_text(json.dumps({"RepetitionTime": value}))
    shown = re.escape(json.dumps(value))  # as written in the sidecar: true, "2.0", [2.0]
    with pytest.raises(InvalidInputError, match=rf"RepetitionTime is {shown}; expected a number "
                                                r"of seconds written as a JSON number such as "
                                                r"2\.0, not a string or true/false \(sidecar of "
                                                r"'tr\.nii'\)"):
        load_scan(path)


def test_sidecar_with_byte_order_mark_is_read(tmp_path):
    side = tmp_path / "bom.json"
    side.write_bytes(b"\xef\xbb\xbf" + json.dumps(SIDE).encode())
    assert load_sidecar(side) == SIDE


def test_sidecar_atlas_must_be_a_string(tmp_path, aal3):
    np.save(tmp_path / "t.npy", np.ones((60, aal3.n_regions)))
    with pytest.raises(InvalidInputError, match=r"The sidecar's Atlas is \['aal3'\] \(for "
                                                r"'t\.npy'\); expected a string"):
        load_scan(tmp_path / "t.npy", sidecar={"RepetitionTime": 2.0, "Atlas": ["aal3"]})


# ---- 5. options -------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [-5, 0, True, 2.5, "50"])
def test_min_volumes_must_be_a_positive_integer(tmp_path, value):
    path = small_nifti(tmp_path / "m.nii")
    with pytest.raises(InvalidInputError, match=r"Invalid value for the 'min_volumes' parameter "
                                                r"\(--min-volumes\): expected a positive integer"
                                                rf".*but got {value!r} instead"):
        load_scan(path, min_volumes=value)


@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_max_bytes_must_be_a_positive_integer(tmp_path, value):
    path = small_nifti(tmp_path / "m.nii")
    with pytest.raises(InvalidInputError, match=r"Invalid value for the 'max_bytes' parameter"):
        load_scan(path, max_bytes=value)


@pytest.mark.parametrize("value", [-1, 0, 1, 1.5, math.nan, math.inf, True, "0.01"])
def test_explain_tolerance_must_be_between_0_and_1(value):
    from fmmtc_core.explain import explain

    # Refused before the model is touched (ens=None would fail on first use).
    with pytest.raises(InvalidInputError, match=r"Invalid value for the 'rel_tol' parameter "
                                                r"\(--tolerance\): expected a finite number "
                                                r"greater than 0 and less than 1"):
        explain(None, np.zeros((3, 4)), None, rel_tol=value)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"abs_tol": -1e-4}, r"'abs_tol' parameter: expected a finite number >= 0"),
    ({"abs_tol": math.nan}, r"'abs_tol' parameter"),
    ({"n_top": -3}, r"'n_top' parameter: expected an integer >= 0"),
    ({"internal_batch_size": 0}, r"'internal_batch_size' parameter: expected a positive integer"),
])
def test_explain_other_numeric_options(kwargs, match):
    from fmmtc_core.explain import explain

    with pytest.raises(InvalidInputError, match=match):
        explain(None, np.zeros((3, 4)), None, **kwargs)


# ---- 6. messages that named the wrong culprit --------------------------------------------------
@pytest.mark.parametrize("sep", ["\t", ","])
def test_region_table_with_byte_order_mark_loads_like_without(tmp_path, aal3, sep):
    data = np.random.default_rng(1).standard_normal((60, aal3.n_regions))
    text = pd.DataFrame(data, columns=list(aal3.names)).to_csv(sep=sep, index=False)
    ext = "tsv" if sep == "\t" else "csv"
    plain = tmp_path / f"plain_seg-aal3.{ext}"
    bom = tmp_path / f"bom_seg-aal3.{ext}"
    plain.write_text(text, encoding="utf-8")
    bom.write_text(text, encoding="utf-8-sig")
    assert bom.read_bytes()[:3] == b"\xef\xbb\xbf"
    a, b = load_scan(plain, sidecar=SIDE), load_scan(bom, sidecar=SIDE)
    np.testing.assert_array_equal(a.table, b.table)
    np.testing.assert_allclose(b.table, data)


def test_headerless_table_with_byte_order_mark_loads(tmp_path, aal3):
    data = np.random.default_rng(2).standard_normal((60, aal3.n_regions))
    path = tmp_path / "n_seg-aal3.csv"
    np.savetxt(path, data, delimiter=",", encoding="utf-8-sig")
    np.testing.assert_allclose(load_scan(path, sidecar=SIDE).table, data)


def test_confounds_and_label_table_with_byte_order_mark(tmp_path):
    conf = tmp_path / "c.tsv"
    fmriprep_confounds(60).to_csv(conf, sep="\t", index=False, na_rep="n/a",
                                  encoding="utf-8-sig")
    df = load_confounds_table(conf, 60)
    assert df.columns[0] == "trans_x"
    atlas = _label_image(tmp_path / "bomlab.nii.gz")
    (tmp_path / "bomlab.tsv").write_text("index\tname\n3\tLeftBlob\n7\tRightBlob\n",
                                         encoding="utf-8-sig")
    assert load_atlas(atlas).names == ("LeftBlob", "RightBlob")


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_infinite_confounds_name_the_file_and_column(tmp_path, bad):
    df = fmriprep_confounds(60)
    df.loc[7, "rot_y"] = bad
    df.to_csv(tmp_path / "c.tsv", sep="\t", index=False, na_rep="n/a")
    with pytest.raises(InvalidInputError, match=rf"Confounds file 'c\.tsv' has non-finite values "
                                                rf"\({bad:g}\) in column 'rot_y' \(1 row\(s\), "
                                                r"first at data row 8\); expected finite numbers "
                                                r"or n/a"):
        load_scan(small_nifti(tmp_path / "s.nii"), confounds=tmp_path / "c.tsv")
    with pytest.raises(InvalidInputError, match=r"The confounds table has non-finite values .* "
                                                r"column 'rot_y'"):
        load_scan(small_nifti(tmp_path / "s.nii"), confounds=df)


def test_region_table_with_infinity_names_the_column(tmp_path, aal3):
    data = np.random.default_rng(3).standard_normal((60, aal3.n_regions))
    data[4, 2] = np.inf
    np.save(tmp_path / "i.npy", data)
    with pytest.raises(InvalidInputError, match=r"i\.npy holds infinite values \(first in column "
                                                r"'Frontal_Sup_2_L', data row 5\)"):
        load_scan(tmp_path / "i.npy", sidecar={"RepetitionTime": 2.0, "Atlas": "aal3"})


def test_bad_label_table_rows_are_clean_refusals(tmp_path):
    atlas = _label_image(tmp_path / "x.nii.gz")
    for text, match in [
        ("index\tname\n3\tA\nseven\tB\n", r"Label table 'x\.tsv', row 3: expected an integer "
                                          r"'index' and a 'name', got 'seven\\tB'"),
        ("index\tname\n3\n", r"row 2: expected an integer 'index' and a 'name'"),
        ("3 A\ninf B\n", r"line 2: expected '<integer label> <name>', got 'inf B'"),
    ]:
        (tmp_path / "x.tsv").write_text(text)
        with pytest.raises(InvalidInputError, match=match):
            load_atlas(atlas, labels_file=tmp_path / "x.tsv")


def test_file_name_with_a_newline_stays_on_one_line(tmp_path):
    path = tmp_path / "bad\nname.nii"
    path.write_bytes(b"\x00" * 400)
    with pytest.raises(InvalidInputError) as info:
        load_scan(path)
    assert "\n" not in str(info.value) and "'bad\\nname.nii'" in str(info.value)


# ---- CLI: exit 2 and one `error:` line ---------------------------------------------------------
@needs_fifo
def test_cli_qc_refuses_a_fifo_scan_in_one_line(tmp_path, capsys):
    fifo = tmp_path / "pipe\nscan.nii.gz"
    os.mkfifo(fifo)
    code, err = bounded(cli, capsys, "qc", fifo, unblock=[fifo])
    assert code == 2
    assert "is not a regular file (it is a named pipe (FIFO))" in assert_one_error_line(err)


@needs_dev_zero
def test_cli_qc_refuses_a_device_sidecar(tmp_path, capsys):
    code, err = bounded(cli, capsys, "qc", small_nifti(tmp_path / "s.nii"),
                        "--sidecar", "/dev/zero")
    assert code == 2
    assert "Sidecar '/dev/zero' is not a regular file" in assert_one_error_line(err)


@pytest.mark.parametrize("value", ["-5", "0"])
def test_cli_qc_refuses_a_non_positive_min_volumes(tmp_path, capsys, value):
    code, err = cli(capsys, "qc", small_nifti(tmp_path / "s.nii"), "--min-volumes", value)
    assert code == 2
    # Refused by the option parser or, failing that, by load_scan: either way one line.
    assert "min-volumes" in assert_one_error_line(err) and value in err


def test_cli_qc_names_the_infinite_confounds_column(tmp_path, capsys):
    df = fmriprep_confounds(60)
    df.loc[3, "csf"] = np.inf
    df.to_csv(tmp_path / "c.tsv", sep="\t", index=False, na_rep="n/a")
    code, err = cli(capsys, "qc", small_nifti(tmp_path / "s.nii"), "--confounds",
                    tmp_path / "c.tsv")
    assert code == 2
    assert "non-finite values (inf) in column 'csf'" in assert_one_error_line(err)
    assert "denoising strategy" not in err


def test_cli_qc_refuses_a_deeply_nested_sidecar(tmp_path, capsys):
    scan = small_nifti(tmp_path / "s.nii")
    (tmp_path / "s.json").write_text("[" * 100_000)
    code, err = cli(capsys, "qc", scan)
    assert code == 2
    assert "100000 levels deep" in assert_one_error_line(err)


def test_cli_parcellate_refuses_a_gzip_bomb_atlas(tmp_path, capsys):
    bomb = _bomb_atlas(tmp_path / "bomb.nii.gz", (4000, 4000, 4000))
    code, err = cli(capsys, "parcellate", small_nifti(tmp_path / "s.nii"), "--atlas", bomb,
                    "--out", tmp_path / "out.tsv")
    assert code == 2
    assert "declares a 4000x4000x4000 image" in assert_one_error_line(err)
    assert not (tmp_path / "out.tsv").exists()


def test_cli_parcellate_refuses_a_bad_vox_offset(tmp_path, capsys):
    scan = small_nifti(tmp_path / "s.nii", off=(VOX_OFFSET, "f", math.nan))
    code, err = cli(capsys, "parcellate", scan, "--atlas", "aal3", "--out", tmp_path / "o.tsv")
    assert code == 2
    assert "vox_offset is nan" in assert_one_error_line(err)


def _gzip_bomb_scan(path, shape, inflated_bytes):
    """A .nii.gz whose header declares ``shape`` float32 and whose stream inflates to
    ``inflated_bytes`` of zeros (a few MB on disk)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape(shape)
    hdr.set_sform(GRID_AFFINE, code=4)
    hdr.set_qform(GRID_AFFINE, code=4)
    hdr["pixdim"][4] = 2.0
    zeros = b"\x00" * (16 * 1024**2)
    with gzip.open(path, "wb", compresslevel=9) as f:
        hdr.write_to(f)
        f.write(b"\x00" * 4)  # extension flag: vox_offset 352
        for _ in range(inflated_bytes // len(zeros)):
            f.write(zeros)
    return path


@pytest.mark.slow
def test_bombs_are_refused_within_a_memory_limit(tmp_path):
    """Run the CLI on a scan and an atlas that would inflate to gigabytes, in a child process
    whose address space is capped at 3 GiB: each is one error line, exit 2, no MemoryError."""
    import subprocess
    import sys

    scan = _gzip_bomb_scan(tmp_path / "bomb_bold.nii.gz", (97, 115, 97, 2500), 1 << 30)
    assert scan.stat().st_size < 8 * 1024**2
    atlas = _bomb_atlas(tmp_path / "bomb_atlas.nii.gz", (4000, 4000, 4000))
    small = save_nifti(tmp_path / "ok_bold.nii.gz", np.ones((31, 37, 31, 60), np.float32))
    limit = 3 * 1024**3
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n"
        "from fmmtc_core.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    for args, match in [(["qc", str(scan)], r"declares .* over the .* limit"),
                        (["parcellate", str(small), "--atlas", str(atlas), "--out",
                          str(tmp_path / "o.tsv")], r"Atlas file 'bomb_atlas\.nii\.gz' declares")]:
        run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                             text=True, timeout=300, env=env)
        assert run.returncode == 2, run.stderr[-2000:]
        assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ")
        assert re.search(match, run.stderr), run.stderr
        assert "MemoryError" not in run.stderr
