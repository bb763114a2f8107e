"""Loading and validation of scans: each class of bad input has its own pinned message."""

from __future__ import annotations

import gzip
import json
import re
import struct
import threading
import tracemalloc

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import GRID_AFFINE, fmriprep_confounds, make_bold, save_nifti

import fmmtc_core.io as fmmtc_io
from fmmtc_core import InvalidInputError
from fmmtc_core._errors import FMMTCWarning
from fmmtc_core.io import find_sidecar, load_scan
from fmmtc_core.preprocess import parcellate


def test_load_valid_nifti_reads_header_only(bold_file):
    scan = load_scan(bold_file)
    assert scan.kind == "nifti"
    assert scan.shape == (31, 37, 31, 60)
    assert scan.tr == pytest.approx(2.0)
    np.testing.assert_allclose(scan.affine, GRID_AFFINE)
    assert scan.warnings == []


@pytest.mark.parametrize("name", ["scan.nii", "scan.nii.gz", "scan.dat"])
def test_kind_is_told_by_content(tmp_path, grid_labels, name):
    # The .dat file has a NIfTI inside: content decides, not the name.
    path = save_nifti(tmp_path / "x.nii.gz" if name.endswith("gz") else tmp_path / "x.nii",
                      make_bold(grid_labels))
    target = tmp_path / name
    path.rename(target)
    assert load_scan(target).kind == "nifti"


def test_nifti2_and_big_endian_are_accepted(tmp_path, grid_labels):
    data = make_bold(grid_labels)
    p2 = save_nifti(tmp_path / "n2.nii", data, nifti2=True)
    assert load_scan(p2).shape[-1] == 60
    big = nib.Nifti1Image(data, GRID_AFFINE, header=nib.Nifti1Header(endianness=">"))
    big.header.set_xyzt_units("mm", "sec")
    big.header["pixdim"][4] = 2.0
    nib.save(big, tmp_path / "be.nii")
    scan = load_scan(tmp_path / "be.nii")
    assert scan._dtype.byteorder == ">"
    sig = parcellate(scan, "aal3")
    ref = parcellate(load_scan(p2), "aal3")
    np.testing.assert_allclose(sig.data, ref.data, rtol=1e-6, equal_nan=True)


def test_tr_in_milliseconds_header_is_converted(tmp_path, grid_labels):
    img = nib.Nifti1Image(make_bold(grid_labels), GRID_AFFINE)
    img.header.set_xyzt_units("mm", "msec")
    img.header["pixdim"][4] = 2000.0
    nib.save(img, tmp_path / "ms.nii")
    assert load_scan(tmp_path / "ms.nii").tr == pytest.approx(2.0)


def test_sidecar_tr_wins_and_disagreement_warns(tmp_path, grid_labels):
    path = save_nifti(tmp_path / "s.nii.gz", make_bold(grid_labels), tr=2.0,
                      sidecar={"RepetitionTime": 1.5})
    assert find_sidecar(path) == tmp_path / "s.json"
    with pytest.warns(FMMTCWarning, match="TR disagreement"):
        scan = load_scan(path)
    assert scan.tr == pytest.approx(1.5)
    assert any("TR disagreement" in w for w in scan.warnings)


# ---- refusals -------------------------------------------------------------------------------
def test_empty_file(tmp_path):
    (tmp_path / "e.nii.gz").write_bytes(b"")
    with pytest.raises(InvalidInputError, match=r"is empty \(0 bytes\)"):
        load_scan(tmp_path / "e.nii.gz")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_scan(tmp_path / "nope.nii")
    with pytest.raises(InvalidInputError, match="is a folder"):
        load_scan(tmp_path)


def test_wrong_magic(tmp_path):
    (tmp_path / "w.nii").write_bytes(b"\x00" * 400)
    with pytest.raises(InvalidInputError, match="not a NIfTI image \\(wrong magic number\\)"):
        load_scan(tmp_path / "w.nii")
    (tmp_path / "w.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InvalidInputError, match="not a NIfTI image .* nor a region time-series"):
        load_scan(tmp_path / "w.bin")


def test_gzip_without_nifti(tmp_path):
    with gzip.open(tmp_path / "g.nii.gz", "wb") as f:
        f.write(b"just some text" * 100)
    with pytest.raises(InvalidInputError, match="gzip-compressed but does not hold a NIfTI"):
        load_scan(tmp_path / "g.nii.gz")


def test_corrupt_gzip(tmp_path):
    (tmp_path / "c.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 200)
    with pytest.raises(InvalidInputError, match="truncated or corrupt gzip"):
        load_scan(tmp_path / "c.nii.gz")


def test_truncated_gzip_is_refused_during_the_read(bold_file):
    raw = bold_file.read_bytes()
    bold_file.write_bytes(raw[: len(raw) // 2])
    scan = load_scan(bold_file)  # the header is intact
    with pytest.raises(InvalidInputError, match="truncated"):
        parcellate(scan, "aal3")


# --------------------------------------------------------------------------------------------
# Parallel decompression of one gzip stream (rapidgzip for threads >= 2, ISA-L for 1)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 KiB, so that the ~1.6 MB test scan is decoded by several threads."""
    monkeypatch.setattr(fmmtc_io, "_PARALLEL_CHUNK_BYTES", 64 * 1024)


def _read_all(scan, threads, hold=None):
    # Copies: with `hold`, a block's memory is reused once the next-but-`hold` is asked for.
    return np.concatenate([np.array(b) for _, b in scan.iter_blocks(
        block_bytes=1 << 20, threads=threads, hold=hold)])


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("hold", [None, 1])
def test_parallel_read_gives_the_bytes_of_the_file(bold_file, small_chunks, threads, hold):
    scan = load_scan(bold_file)
    assert fmmtc_io._parallel_gzip_ok(bold_file, scan._offset + scan.n_volumes * 4 * scan.n_voxels)
    stored = np.asanyarray(nib.load(bold_file).dataobj).reshape(-1, scan.n_volumes, order="F").T
    parallel = _read_all(scan, threads, hold)
    np.testing.assert_array_equal(parallel, stored)
    np.testing.assert_array_equal(parallel, _read_all(scan, 1))


def test_parallel_blocks_are_read_only(bold_file, small_chunks):
    _, block = next(iter(load_scan(bold_file).iter_blocks(block_bytes=1 << 20, threads=2)))
    with pytest.raises(ValueError, match="read-only"):
        block[0, 0] = 1.0


def _damage(path, where):
    raw = bytearray(path.read_bytes())
    if where == "middle":  # a flipped byte in the deflate data; the trailer stays consistent
        raw[len(raw) * 2 // 3] ^= 0x55
    elif where == "crc":  # the stored CRC-32 no longer matches the content
        raw[-8] ^= 0x01
    else:  # truncated: the trailer is gone, so the ISA-L path reads it and names it
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("where", ["middle", "crc", "truncated"])
def test_damaged_gzip_is_refused_by_every_reader(bold_file, small_chunks, capfd, threads, where):
    _damage(bold_file, where)
    scan = load_scan(bold_file)  # the header is intact
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(InvalidInputError,
                       match=r"sub-01_task-rest_bold\.nii\.gz is (a truncated or corrupt gzip "
                             r"file \(.+\); re-export or re-copy the scan|truncated)"):
        parcellate(scan, "aal3", threads=threads)
    # Bad input changes nothing: no reader thread is left behind, nothing on stderr (the CLI
    # promises one error line), and the same file still reads the same way.
    assert {t.name for t in threading.enumerate()} <= before
    assert capfd.readouterr().err == ""


def test_stopping_early_ends_the_parallel_reader(bold_file, small_chunks):
    before = {t.name for t in threading.enumerate()}
    blocks = load_scan(bold_file).iter_blocks(block_bytes=1 << 20, threads=2)
    next(blocks)
    blocks.close()
    assert {t.name for t in threading.enumerate()} <= before


def test_read_threads_default_and_environment(monkeypatch):
    monkeypatch.delenv("FMMTC_READ_THREADS", raising=False)
    assert 1 <= fmmtc_io.default_read_threads() <= fmmtc_io.MAX_DEFAULT_READ_THREADS
    monkeypatch.setattr(fmmtc_io.os, "sched_getaffinity", lambda pid: set(range(64)),
                        raising=False)
    assert fmmtc_io.default_read_threads() == fmmtc_io.MAX_DEFAULT_READ_THREADS
    # one core is left to the parcellation: on 2 cores the read is ISA-L's, in one thread
    monkeypatch.setattr(fmmtc_io.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert fmmtc_io.default_read_threads() == 1
    monkeypatch.setattr(fmmtc_io.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3},
                        raising=False)
    assert fmmtc_io.default_read_threads() == 3
    monkeypatch.setenv("FMMTC_READ_THREADS", " 3 ")
    assert fmmtc_io.default_read_threads() == 3


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_read_threads_environment_is_refused(bold_file, monkeypatch, value):
    monkeypatch.setenv("FMMTC_READ_THREADS", value)
    with pytest.raises(InvalidInputError,
                       match=rf"^FMMTC_READ_THREADS must be a whole number of at least 1, got "
                             rf"'{re.escape(value)}'\.$"):
        parcellate(load_scan(bold_file), "aal3")


@pytest.mark.parametrize("threads", [0, -1, True, 2.0])
def test_bad_threads_argument_is_refused(bold_file, threads):
    with pytest.raises(InvalidInputError,
                       match=r"Invalid value for the 'threads' parameter: expected a positive "
                             r"integer \(threads that decompress"):
        parcellate(load_scan(bold_file), "aal3", threads=threads)


def test_truncated_uncompressed(tmp_path, grid_labels):
    path = save_nifti(tmp_path / "t.nii", make_bold(grid_labels))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(InvalidInputError, match="is truncated: the header declares"):
        load_scan(path)


def test_3d_image(tmp_path, grid_labels):
    path = save_nifti(tmp_path / "a.nii.gz", make_bold(grid_labels)[..., 0])
    with pytest.raises(InvalidInputError, match="is a 3D image"):
        load_scan(path)
    path = save_nifti(tmp_path / "b.nii.gz", make_bold(grid_labels)[..., :1])
    with pytest.raises(InvalidInputError, match="is a 3D image"):
        load_scan(path)


def test_too_few_volumes(tmp_path, grid_labels):
    path = save_nifti(tmp_path / "f.nii.gz", make_bold(grid_labels, n_volumes=20))
    with pytest.raises(InvalidInputError, match="has 20 volumes; at least 50"):
        load_scan(path)
    assert load_scan(path, min_volumes=10).n_volumes == 20


@pytest.mark.parametrize(
    ("sidecar", "match"),
    [
        ({}, "repetition time \\(TR\\) of .* is missing"),
        ({"RepetitionTime": 0}, "TR\\) from the JSON sidecar is 0 s; expected a positive"),
        ({"RepetitionTime": -2}, "is -2 s; expected a positive"),
        ({"RepetitionTime": 2000}, "2000 s, which is implausible .* in milliseconds"),
        ({"RepetitionTime": "fast"}, 'RepetitionTime is "fast"; expected a number'),
    ],
)
def test_bad_tr(tmp_path, grid_labels, sidecar, match):
    path = save_nifti(tmp_path / "tr.nii.gz", make_bold(grid_labels), tr=0.0, sidecar=sidecar)
    with pytest.raises(InvalidInputError, match=match):
        load_scan(path)


def test_bad_sidecar_json(bold_file, tmp_path):
    side = tmp_path / "x.json"
    side.write_text("{not json")
    with pytest.raises(InvalidInputError, match="is not valid JSON"):
        load_scan(bold_file, sidecar=side)
    side.write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="must hold a JSON object"):
        load_scan(bold_file, sidecar=side)


def _tiny_header_file(path, dims, dtype=np.float32):
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(dims)
    hdr.set_zooms((2.0, 2.0, 2.0, 2.0)[: len(dims)])
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_sform(np.diag([2.0, 2.0, 2.0, 1.0]), code=4)
    with open(path, "wb") as f:
        hdr.write_to(f)
        f.write(b"\x00" * (352 - 348) + b"\x00" * 600)


def test_header_over_memory_budget_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.nii"
    _tiny_header_file(path, (1000, 1000, 1000, 1000))
    assert path.stat().st_size < 2048
    tracemalloc.start()
    with pytest.raises(InvalidInputError, match=r"declares 3725\.3 GiB of voxel data .* limit"):
        load_scan(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 10 * 1024**2
    with pytest.raises(InvalidInputError, match="declares .* over the 0.0 GiB limit"):
        _tiny_header_file(tmp_path / "m.nii", (10, 10, 10, 60))
        load_scan(tmp_path / "m.nii", max_bytes=1000)


def test_all_nan_zero_constant(tmp_path, grid_labels):
    data = make_bold(grid_labels)
    for name, values, match in [
        ("nan", np.full_like(data, np.nan), "only NaN values"),
        ("zero", np.zeros_like(data), "only zeros"),
        ("const", np.full_like(data, 7.0), "constant over time in every brain voxel"),
    ]:
        path = save_nifti(tmp_path / f"{name}.nii.gz", values)
        with pytest.raises(InvalidInputError, match=match):
            parcellate(load_scan(path), "aal3")


def test_not_in_mni_space(tmp_path, grid_labels):
    affine = GRID_AFFINE.copy()
    affine[:3, 3] = [0.0, 0.0, 0.0]  # a scanner-space grid starting at the origin
    path = save_nifti(tmp_path / "native.nii.gz", make_bold(grid_labels), affine=affine)
    with pytest.raises(InvalidInputError, match="not in MNI space"):
        parcellate(load_scan(path), "aal3")


def test_few_nan_voxels_warn(tmp_path, grid_labels):
    data = make_bold(grid_labels)
    brain = np.argwhere(grid_labels.region_index >= 0)[:5]
    for i, j, k in brain:
        data[i, j, k, 10] = np.nan
    path = save_nifti(tmp_path / "fewnan.nii.gz", data)
    with pytest.warns(FMMTCWarning, match="5 atlas voxel\\(s\\) hold NaN"):
        sig = parcellate(load_scan(path), "aal3")
    assert np.isfinite(sig.data[:, grid_labels.n_voxels > 0]).all()


def test_confounds_rows_must_match(bold_file, tmp_path):
    conf = tmp_path / "c.tsv"
    fmriprep_confounds(59).to_csv(conf, sep="\t", index=False, na_rep="n/a")
    with pytest.raises(InvalidInputError, match="has 59 rows but the scan has 60 volumes"):
        load_scan(bold_file, confounds=conf)
    fmriprep_confounds(60).to_csv(conf, sep="\t", index=False, na_rep="n/a")
    scan = load_scan(bold_file, confounds=conf)
    assert scan.confounds.shape[0] == 60
    assert np.isnan(scan.confounds["framewise_displacement"].iloc[0])


def test_confounds_non_numeric(bold_file, tmp_path):
    conf = tmp_path / "c.tsv"
    df = fmriprep_confounds(60)
    df["trans_x"] = "left"
    df.to_csv(conf, sep="\t", index=False)
    with pytest.raises(InvalidInputError, match="non-numeric columns \\['trans_x'\\]"):
        load_scan(bold_file, confounds=conf)


# ---- region tables --------------------------------------------------------------------------
def _table(aal3, n=60, seed=0):
    return np.random.default_rng(seed).standard_normal((n, aal3.n_regions))


def test_table_with_header_and_seg_entity(tmp_path, aal3):
    data = _table(aal3)
    path = tmp_path / "sub-01_seg-aal3_timeseries.tsv"
    df = pd.DataFrame(data, columns=list(aal3.names))
    # Columns in another order are put back in atlas order by name.
    df[list(reversed(aal3.names))].to_csv(path, sep="\t", index=False)
    (tmp_path / "sub-01_seg-aal3_timeseries.json").write_text(json.dumps({"RepetitionTime": 2}))
    scan = load_scan(path)
    assert scan.kind == "table" and scan.atlas_name == "AAL3"
    np.testing.assert_allclose(scan.table, data)


def test_table_csv_npy_and_sidecar_atlas(tmp_path, aal3):
    data = _table(aal3)
    np.save(tmp_path / "x.npy", data)
    scan = load_scan(tmp_path / "x.npy", sidecar={"RepetitionTime": 2.0, "Atlas": "AAL3"})
    np.testing.assert_allclose(scan.table, data)
    np.savetxt(tmp_path / "y_seg-AAL3.csv", data, delimiter=",")
    scan = load_scan(tmp_path / "y_seg-AAL3.csv", tr=2.0)
    np.testing.assert_allclose(scan.table, data)


def test_table_refusals(tmp_path, aal3):
    data = _table(aal3)
    side = {"RepetitionTime": 2.0}
    np.savetxt(tmp_path / "noatlas.tsv", data, delimiter="\t")
    with pytest.raises(InvalidInputError, match="Cannot tell which atlas"):
        load_scan(tmp_path / "noatlas.tsv", sidecar=side)
    np.savetxt(tmp_path / "few_seg-aal3.tsv", data[:, :100], delimiter="\t")
    with pytest.raises(InvalidInputError, match="has 100 columns but atlas AAL3 has 166"):
        load_scan(tmp_path / "few_seg-aal3.tsv", sidecar=side)
    np.savetxt(tmp_path / "tr_seg-aal3.tsv", _table(aal3, n=60).T[:, :60], delimiter="\t")
    with pytest.raises(InvalidInputError, match="looks transposed"):
        load_scan(tmp_path / "tr_seg-aal3.tsv", sidecar=side)
    names = list(aal3.names)
    names[3] = "Not_A_Region"
    pd.DataFrame(data, columns=names).to_csv(tmp_path / "n_seg-aal3.tsv", sep="\t", index=False)
    with pytest.raises(InvalidInputError, match="do not match atlas AAL3.*not in the atlas"):
        load_scan(tmp_path / "n_seg-aal3.tsv", sidecar=side)
    df = pd.DataFrame(data, columns=list(aal3.names)).astype(object)
    df.iloc[4, 2] = "abc"
    df.to_csv(tmp_path / "s_seg-aal3.tsv", sep="\t", index=False)
    with pytest.raises(InvalidInputError, match="data row 5, column 'Frontal_Sup_2_L' holds 'abc'"):
        load_scan(tmp_path / "s_seg-aal3.tsv", sidecar=side)
    np.savetxt(tmp_path / "z_seg-aal3.tsv", np.zeros_like(data), delimiter="\t")
    with pytest.raises(InvalidInputError, match="holds only zeros"):
        load_scan(tmp_path / "z_seg-aal3.tsv", sidecar=side)
    np.savetxt(tmp_path / "short_seg-aal3.tsv", data[:10], delimiter="\t")
    with pytest.raises(InvalidInputError, match="has 10 volumes; at least 50"):
        load_scan(tmp_path / "short_seg-aal3.tsv", sidecar=side)
    with pytest.raises(InvalidInputError, match="Unknown atlas 'nope'"):
        load_scan(tmp_path / "z_seg-aal3.tsv", sidecar={"RepetitionTime": 2.0, "Atlas": "nope"})


def test_table_atlas_argument(tmp_path, aal3):
    data = _table(aal3)
    np.save(tmp_path / "plain.npy", data)
    scan = load_scan(tmp_path / "plain.npy", atlas="aal3", tr=2.0)
    assert scan.atlas_name == "AAL3"
    np.save(tmp_path / "x_seg-aal3.npy", data)
    assert load_scan(tmp_path / "x_seg-aal3.npy", atlas="AAL3", tr=2.0).atlas_name == "AAL3"
    with pytest.raises(InvalidInputError, match="holds AAL3 region series, but atlas HCPEx"):
        load_scan(tmp_path / "x_seg-aal3.npy", atlas="hcpex", tr=2.0)


def test_npy_refusals(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInputError, match="object arrays are refused"):
        load_scan(tmp_path / "o.npy", sidecar={"RepetitionTime": 2, "Atlas": "aal3"})
    np.save(tmp_path / "d3.npy", np.zeros((2, 3, 4)))
    with pytest.raises(InvalidInputError, match="expected a 2D table"):
        load_scan(tmp_path / "d3.npy", sidecar={"RepetitionTime": 2, "Atlas": "aal3"})


def test_table_missing_region_warns(tmp_path, aal3):
    data = _table(aal3)
    data[:, 7] = np.nan
    np.save(tmp_path / "m.npy", data)
    with pytest.warns(FMMTCWarning, match="1 region\\(s\\) have no values"):
        scan = load_scan(tmp_path / "m.npy", sidecar={"RepetitionTime": 2, "Atlas": "aal3"})
    assert scan.warnings


def test_nifti_pair_header_refused(tmp_path):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 4, 4, 60))
    hdr["magic"] = b"ni1"
    with open(tmp_path / "p.hdr", "wb") as f:
        hdr.write_to(f)
    raw = (tmp_path / "p.hdr").read_bytes()
    assert raw[344:348] == b"ni1\x00"
    with pytest.raises(InvalidInputError, match="NIfTI pair"):
        load_scan(tmp_path / "p.hdr")


def test_nonsense_dimensions(tmp_path):
    path = tmp_path / "d.nii"
    _tiny_header_file(path, (4, 4, 4, 60))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<h", raw, 40, 9)  # dim[0] = 9: not a valid NIfTI rank
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidInputError, match="invalid NIfTI header: dimensions"):
        load_scan(path)
