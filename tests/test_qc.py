"""QC metrics and verdicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import fmriprep_confounds, make_bold, save_nifti

from fmmtc_core.io import load_scan
from fmmtc_core.qc import QCThresholds, qc_report


def _scan(tmp_path, grid_labels, *, confounds=None, tr=2.0, noise=8.0, data=None, name="q"):
    data = make_bold(grid_labels, noise=noise) if data is None else data
    path = save_nifti(tmp_path / f"{name}.nii.gz", data, tr=tr)
    return load_scan(path, confounds=confounds)


def test_clean_scan_passes(tmp_path, grid_labels, aal3):
    rep = qc_report(_scan(tmp_path, grid_labels, confounds=fmriprep_confounds(60)), atlas=aal3,
                    thresholds=QCThresholds(uncovered_warn=0.5))
    assert rep.verdict == "pass", (rep.reasons, rep.warnings)
    assert rep.passed and rep.reasons == []
    assert any("resampled" in n for n in rep.notes)
    assert rep.fd_mean == pytest.approx(np.nanmean(fmriprep_confounds(60)["framewise_displacement"]))
    assert rep.frac_high_motion == 0.0
    assert rep.tsnr_median > 30
    d = rep.to_dict(series=True)
    json.dumps(d)  # JSON friendly: no NaN, no arrays
    assert d["verdict"] == "pass" and d["n_volumes"] == 60 and d["tr_s"] == 2.0
    assert len(d["fd_mm"]) == 60 and d["fd_mm"][0] is None
    assert len(d["carpet"]) == rep.carpet.shape[0]


def test_default_thresholds_flag_small_regions_on_a_coarse_grid(tmp_path, grid_labels, aal3):
    rep = qc_report(_scan(tmp_path, grid_labels), atlas=aal3)
    # On a 6 mm grid many small AAL3 nuclei have < 5 voxels: a coverage warning, by name.
    assert rep.verdict == "warn"
    assert "Thal_AV_L" in rep.uncovered_regions
    assert any("not covered" in r for r in rep.reasons)


def test_high_motion_fails(tmp_path, grid_labels, aal3):
    conf = fmriprep_confounds(60, fd_scale=1.0)
    rep = qc_report(_scan(tmp_path, grid_labels, confounds=conf), atlas=aal3)
    assert rep.verdict == "fail" and not rep.passed
    assert any("Mean framewise displacement" in r for r in rep.reasons)
    assert any("high-motion" in r for r in rep.reasons)


def test_low_tsnr_fails(tmp_path, grid_labels, aal3):
    rep = qc_report(_scan(tmp_path, grid_labels, noise=200.0), atlas=aal3)
    assert rep.verdict == "fail"
    assert any("Median tSNR" in r for r in rep.reasons)


def test_half_brain_field_of_view_fails(tmp_path, grid_labels, aal3):
    data = make_bold(grid_labels)
    data[:, :, 14:, :] = 0.0  # the top of the brain is outside the slab
    rep = qc_report(_scan(tmp_path, grid_labels, data=data), atlas=aal3)
    assert rep.verdict == "fail"
    assert any("no or too few voxels with signal" in r for r in rep.reasons)


def test_unusual_tr_warns_and_input_warnings_are_carried(tmp_path, grid_labels, aal3):
    path = save_nifti(tmp_path / "w.nii.gz", make_bold(grid_labels), tr=2.0,
                      sidecar={"RepetitionTime": 4.0})
    with pytest.warns(UserWarning):
        scan = load_scan(path)
    rep = qc_report(scan, atlas=aal3, thresholds=QCThresholds(uncovered_warn=0.5))
    assert rep.verdict == "warn"
    assert any("TR 4 s is outside" in r for r in rep.reasons)
    assert any("TR disagreement" in w for w in rep.warnings)


def test_table_scan_has_no_voxel_metrics(tmp_path, aal3):
    np.save(tmp_path / "t.npy", np.random.default_rng(0).standard_normal((60, aal3.n_regions)))
    scan = load_scan(tmp_path / "t.npy", sidecar={"RepetitionTime": 2.0, "Atlas": "aal3"})
    rep = qc_report(scan)
    assert rep.tsnr_median is None and rep.carpet is None
    assert rep.verdict == "warn" and not rep.motion_known  # no confounds: motion unknown
    assert rep.to_dict()["tsnr_median"] is None


def test_unknown_motion_is_a_warning_not_a_pass(tmp_path, grid_labels, aal3):
    """No confounds file: FD cannot be measured, so the scan does not 'pass' (mean FD 'n/a'
    looked like a clean bill of health); it is a warning that says why."""
    th = QCThresholds(uncovered_warn=0.5)
    rep = qc_report(_scan(tmp_path, grid_labels), atlas=aal3, thresholds=th)
    assert rep.verdict == "warn" and rep.passed and not rep.motion_known
    assert rep.reasons == [
        "Head motion is unknown: no fMRIPrep confounds file was given, so framewise "
        "displacement (FD) could not be measured. Motion can bias connectivity; upload the "
        "scan's desc-confounds_timeseries.tsv to check it."]
    assert rep.to_dict()["motion_known"] is False and rep.to_dict()["fd_mean_mm"] is None
    # a confounds table without FD or std_dvars cannot tell either
    conf = fmriprep_confounds(60).drop(columns=["framewise_displacement", "std_dvars"])
    rep = qc_report(_scan(tmp_path, grid_labels, confounds=conf, name="c"), atlas=aal3,
                    thresholds=th)
    assert rep.verdict == "warn" and not rep.motion_known
    assert rep.reasons[0].startswith("Head motion is unknown: the confounds file has no "
                                     "framewise_displacement or std_dvars column")
    # with FD measured, the same scan passes
    rep = qc_report(_scan(tmp_path, grid_labels, confounds=fmriprep_confounds(60), name="d"),
                    atlas=aal3, thresholds=th)
    assert rep.verdict == "pass" and rep.motion_known and rep.to_dict()["motion_known"]


def test_unknown_space_is_a_warn_reason_listed_once(tmp_path, grid_labels, aal3):
    import struct

    from fmmtc_core._errors import FMMTCWarning

    path = save_nifti(tmp_path / "noorient.nii", make_bold(grid_labels))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<hh", raw, 252, 0, 0)  # qform_code = sform_code = 0
    path.write_bytes(bytes(raw))
    with pytest.warns(FMMTCWarning, match="space is unknown"):
        scan = load_scan(path)
    # nibabel's default grid is shifted from MNI: relax coverage to isolate the space reason.
    rep = qc_report(scan, atlas=aal3, thresholds=QCThresholds(uncovered_warn=0.9,
                                                              uncovered_fail=0.95))
    assert rep.verdict == "warn"
    assert [r for r in rep.reasons if "space is unknown" in r] == [
        "'noorient.nii' has no orientation in its NIfTI header (qform_code and sform_code are "
        "both 0), so its space is unknown; it was placed on nibabel's default centred grid and "
        "read as MNI. Expected an MNI-space image (e.g. fMRIPrep space-MNI152NLin2009cAsym); "
        "check the atlas overlay."
    ]
    assert not any("space is unknown" in w for w in rep.warnings)
