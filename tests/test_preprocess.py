"""Parcellation (equal to nilearn's masker), cleaning and model-window preparation."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import GRID_AFFINE, GRID_SHAPE, fmriprep_confounds, make_bold, save_nifti
from nilearn.maskers import NiftiLabelsMasker

from fmmtc_core import InvalidInputError
from fmmtc_core._errors import FMMTCWarning
from fmmtc_core.io import load_scan
from fmmtc_core.preprocess import clean, make_window, parcellate, robust_scale


def _nilearn_means(path, grid_labels, affine=GRID_AFFINE):
    labels = nib.Nifti1Image(grid_labels.labels_data, affine)
    return NiftiLabelsMasker(labels, strategy="mean", standardize=None).fit().transform(str(path))


@pytest.mark.parametrize("ext", ["nii", "nii.gz"])
@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_parcellation_equals_nilearn(tmp_path, grid_labels, aal3, ext, dtype):
    data = make_bold(grid_labels)
    kw = {}
    if dtype == "int16":
        kw = {"dtype": np.int16, "slope": 0.05, "inter": 10.0}
    path = save_nifti(tmp_path / f"b.{ext}", data, **kw)
    sig = parcellate(load_scan(path), aal3)
    ref = _nilearn_means(path, grid_labels)
    present = grid_labels.n_voxels > 0
    assert sig.data.shape == (60, aal3.n_regions)
    assert ref.shape == (60, int(present.sum()))
    np.testing.assert_allclose(sig.data[:, present], ref, rtol=1e-5)
    assert np.isnan(sig.data[:, ~present]).all()
    np.testing.assert_array_equal(sig.n_voxels, grid_labels.n_voxels)


@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_parallel_decompression_gives_nilearns_result(tmp_path, grid_labels, aal3, monkeypatch,
                                                      dtype):
    # Small chunks so that several rapidgzip threads share the ~1.6 MB file.
    monkeypatch.setattr("fmmtc_core.io._PARALLEL_CHUNK_BYTES", 64 * 1024)
    kw = {"dtype": np.int16, "slope": 0.05, "inter": 10.0} if dtype == "int16" else {}
    path = save_nifti(tmp_path / "b.nii.gz", make_bold(grid_labels), **kw)
    one = parcellate(load_scan(path), aal3, threads=1)  # ISA-L
    two = parcellate(load_scan(path), aal3, threads=2)  # rapidgzip
    np.testing.assert_array_equal(two.data, one.data)
    np.testing.assert_array_equal(two.voxel_stats.dvars, one.voxel_stats.dvars)
    present = grid_labels.n_voxels > 0
    np.testing.assert_allclose(two.data[:, present], _nilearn_means(path, grid_labels), rtol=1e-5)


def test_parcellation_block_size_does_not_change_results(tmp_path, grid_labels, aal3):
    path = save_nifti(tmp_path / "b.nii.gz", make_bold(grid_labels))
    scan = load_scan(path)
    whole = parcellate(scan, aal3)
    blocks = list(scan.iter_blocks(block_bytes=1))  # one volume per block
    assert len(blocks) == 60 and blocks[0][1].shape == (1, int(np.prod(GRID_SHAPE)))
    orig = scan.iter_blocks
    scan.iter_blocks = lambda **kw: orig(block_bytes=7 * np.prod(GRID_SHAPE) * 4, **kw)
    np.testing.assert_allclose(parcellate(scan, aal3).data, whole.data, rtol=1e-6)


def test_progress_callback(tmp_path, grid_labels, aal3):
    path = save_nifti(tmp_path / "b.nii", make_bold(grid_labels))
    seen = []
    parcellate(load_scan(path), aal3, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (60, 60)


def test_other_grid_is_resampled_with_a_warning(tmp_path, aal3):
    affine = np.array([[-5.0, 0, 0, 90], [0, 5, 0, -126], [0, 0, 5, -72], [0, 0, 0, 1]])
    shape = (37, 44, 37)
    grid = aal3.on_grid(shape, affine)
    rng = np.random.default_rng(1)
    data = np.zeros(shape + (55,), np.float32)
    brain = grid.region_index >= 0
    data[brain] = 500 + rng.standard_normal((int(brain.sum()), 55)).astype(np.float32)
    path = save_nifti(tmp_path / "fsl.nii.gz", data, affine=affine)
    sig = parcellate(load_scan(path), aal3)
    assert any("differs from the atlas grid" in n for n in sig.notes)
    assert sig.warnings == []
    ref = NiftiLabelsMasker(aal3.labels_img, strategy="mean", standardize=None).fit().transform(str(path))
    present = grid.n_voxels > 0
    np.testing.assert_allclose(sig.data[:, present], ref, rtol=1e-5)


def test_voxel_stats(tmp_path, grid_labels, aal3):
    path = save_nifti(tmp_path / "b.nii.gz", make_bold(grid_labels, baseline=800, noise=8))
    vs = parcellate(load_scan(path), aal3).voxel_stats
    # Voxel SD ~ sqrt(10^2 + 8^2) ~ 12.8 around 800: tSNR ~ 62.
    assert 50 < vs.tsnr_voxels_median < 75
    assert vs.dvars.shape == (60,) and vs.dvars[0] == 0 and vs.dvars[1] > 0
    assert vs.carpet.shape[1] == 60 and vs.carpet.shape[0] == vs.carpet_regions.shape[0]
    np.testing.assert_allclose(vs.carpet.mean(axis=1), 0, atol=1e-4)
    assert vs.n_nan_voxels == 0 and vs.n_flat_voxels == 0


def test_table_parcellation_is_identity(tmp_path, aal3):
    data = np.random.default_rng(0).standard_normal((60, aal3.n_regions))
    np.save(tmp_path / "t.npy", data)
    scan = load_scan(tmp_path / "t.npy", sidecar={"RepetitionTime": 2.0, "Atlas": "aal3"})
    sig = parcellate(scan)
    np.testing.assert_allclose(sig.data, data.astype(np.float32))
    assert sig.atlas.names == aal3.names and sig.voxel_stats is None
    with pytest.raises(InvalidInputError, match="cannot be parcellated again with atlas HCPEx"):
        parcellate(scan, "hcpex")


# ---- cleaning -------------------------------------------------------------------------------
def _signals(tmp_path, grid_labels, aal3, confounds=None, n=120, tr=2.0):
    path = save_nifti(tmp_path / "c.nii.gz", make_bold(grid_labels, n_volumes=n), tr=tr)
    return parcellate(load_scan(path, confounds=confounds), aal3)


def test_clean_matches_nilearn_signal_clean(tmp_path, grid_labels, aal3):
    from nilearn import signal as nsignal

    sig = _signals(tmp_path, grid_labels, aal3)
    out = clean(sig)
    ok = np.isfinite(sig.data).all(axis=0)
    ref = nsignal.clean(sig.data[:, ok].astype(np.float64), detrend=True, standardize=None,
                        low_pass=0.1, high_pass=0.01, t_r=2.0)
    np.testing.assert_allclose(out.data[:, ok], ref, rtol=1e-4, atol=1e-4)
    assert out.cleaned and out.cleaning["low_pass"] == 0.1
    # A slow drift added to every region is gone after cleaning.
    drift = sig.data.copy()
    drift += np.linspace(0, 50, sig.n_volumes, dtype=np.float32)[:, None]
    sig.data = drift
    trend = np.linspace(-1, 1, sig.n_volumes)
    cleaned = clean(sig).data[:, ok]
    def r_trend(x):
        return np.median([abs(np.corrcoef(trend, x[:, j])[0, 1]) for j in range(x.shape[1])])

    assert r_trend(drift[:, ok]) > 0.7
    assert r_trend(cleaned) < 0.15


def test_clean_with_fmriprep_confounds_and_scrubbing(tmp_path, grid_labels, aal3):
    conf = fmriprep_confounds(120, spikes=(30, 31, 70))
    sig = _signals(tmp_path, grid_labels, aal3, confounds=conf)
    simple = clean(sig, strategy="simple")
    assert simple.sample_mask is None and simple.n_volumes == 120
    assert simple.cleaning["strategy"] == "simple"
    scrubbed = clean(sig, scrub=True)
    assert scrubbed.n_volumes < 120
    assert 30 not in scrubbed.sample_mask and 70 not in scrubbed.sample_mask
    assert scrubbed.cleaning["n_volumes_kept"] == scrubbed.n_volumes


def test_clean_drops_low_pass_above_nyquist(tmp_path, grid_labels, aal3):
    sig = _signals(tmp_path, grid_labels, aal3, tr=6.0)  # Nyquist 0.083 Hz
    with pytest.warns(FMMTCWarning, match="above the Nyquist frequency"):
        out = clean(sig)
    assert out.cleaning["low_pass"] is None


def test_clean_refusals(tmp_path, grid_labels, aal3):
    sig = _signals(tmp_path, grid_labels, aal3)
    with pytest.raises(InvalidInputError, match="Invalid value for the 'strategy' parameter"):
        clean(sig, strategy="aggressive")
    with pytest.raises(InvalidInputError, match="high_pass \\(0.2 Hz\\) must be below"):
        clean(sig, high_pass=0.2, low_pass=0.1)
    with pytest.warns(FMMTCWarning, match="Scrubbing needs an fMRIPrep confounds file"):
        clean(sig, scrub=True)


def test_scrubbing_everything_is_refused(tmp_path, grid_labels, aal3):
    conf = fmriprep_confounds(120, spikes=range(1, 118))
    sig = _signals(tmp_path, grid_labels, aal3, confounds=conf)
    with pytest.raises(InvalidInputError, match="too much head motion"):
        clean(sig, scrub=True)


# ---- windows --------------------------------------------------------------------------------
def test_robust_scale():
    x = np.random.default_rng(0).standard_normal((200, 4)) * [1, 5, 10, 0] + [0, 3, -2, 7]
    x[:, 3] = 7.0
    s = robust_scale(x)
    np.testing.assert_allclose(np.median(s[:, :3], axis=0), 0, atol=1e-6)
    q75, q25 = np.percentile(s[:, :3], [75, 25], axis=0)
    np.testing.assert_allclose(q75 - q25, 1, atol=1e-6)
    assert np.all(s[:, 3] == 0)  # constant region: centred, not divided by 0
    nan = np.full((10, 1), np.nan)
    assert np.all(robust_scale(nan) == 0)


def test_make_window_crop_pad_resample():
    x = np.random.default_rng(0).standard_normal((300, 5))
    w = make_window(x, 200)
    assert w.shape == (5, 200) and w.dtype == np.float32
    np.testing.assert_allclose(w, robust_scale(x[50:250]).T)
    w = make_window(x, 200, start=0, scale=False)
    np.testing.assert_allclose(w, x[:200].T.astype(np.float32))
    short = make_window(x[:120], 200)
    assert short.shape == (5, 200) and np.all(short[:, 120:] == 0)
    # TR 2 s resampled to 1 s doubles the samples (minus one).
    up = make_window(x[:100], 250, tr=2.0, target_tr=1.0, scale=False)
    np.testing.assert_allclose(up[:, ::2][:, :100], x[:100].T, rtol=1e-6)
    np.testing.assert_allclose(up[:, 1], (x[0] + x[1]) / 2, rtol=1e-6)
    with pytest.raises(InvalidInputError, match="Window start 500 is out of range"):
        make_window(x, 200, start=500)
    with pytest.raises(InvalidInputError, match="needs the TR"):
        make_window(x, 200, target_tr=1.0)


def test_relative_amplitude_compares_regions_within_a_scan():
    """log SD minus the scan's median region: a gain shared by every region (scanner, site)
    cancels, a region twice as variable reads log 2, dead regions read 0."""
    from fmmtc_core.preprocess import relative_amplitude

    gen = np.random.default_rng(0)
    x = gen.standard_normal((400, 5))
    x[:, 1] *= 2.0
    x[:, 4] = 3.0  # constant: no signal
    a = relative_amplitude(x)
    assert a.dtype == np.float32 and a.shape == (5,) and a[4] == 0.0
    live = np.log(x[:, :4].std(axis=0, ddof=1))
    assert np.allclose(a[:4], live - np.median(live), atol=1e-6)
    assert abs(a[1] - np.log(2.0)) < 0.15
    assert np.allclose(relative_amplitude(7.5 * x), a, atol=1e-6)
    x[3, 2] = np.nan
    assert relative_amplitude(x)[2] == 0.0
    assert not relative_amplitude(x[:2]).any()


def test_regional_dynamics_rows_are_relative_finite_and_measure_spectral_shape():
    """Row 0 is the relative amplitude; rows 0-1 ignore a gain shared by every region; a slow
    region has more of its power in the ALFF band and a higher lag-1 autocorrelation than a
    white one; dead regions and short scans take finite fills."""
    from fmmtc_core.preprocess import DYNAMICS_ROWS, regional_dynamics, relative_amplitude

    gen = np.random.default_rng(0)
    tr, n = 2.0, 300
    t = np.arange(n) * tr
    x = gen.standard_normal((n, 5))
    x[:, 0] = np.sin(2 * np.pi * 0.03 * t) + 0.1 * gen.standard_normal(n)  # slow, in band
    x[:, 4] = 1.0  # constant: no signal
    d = regional_dynamics(x, tr)
    assert DYNAMICS_ROWS == ("relative_log_sd", "relative_log_alff", "falff", "ac1")
    assert d.dtype == np.float32 and d.shape == (4, 5) and np.isfinite(d).all()
    assert np.array_equal(d[0], relative_amplitude(x))
    assert d[2, 0] > d[2, 1:4].max() and d[3, 0] > 0.9 > abs(d[3, 1:4]).max()
    assert np.allclose(regional_dynamics(5.0 * x, tr), d, atol=1e-5)
    assert d[0, 4] == d[1, 4] == 0.0
    assert d[2, 4] == np.median(d[2, :4]) and d[3, 4] == np.median(d[3, :4])
    # too short to resolve 0.01 Hz: no ALFF band, the fills everywhere
    short = regional_dynamics(x[:4], tr)  # 8 s: the lowest frequency is 0.125 Hz
    assert np.isfinite(short).all() and not short[1].any()
    assert not regional_dynamics(x[:2], tr).any()


def test_prepare_gives_the_dynamics_to_models_that_read_them(tmp_path, grid_labels, aal3):
    from fmmtc_core.preprocess import prepare, regional_dynamics

    signals = clean(_signals(tmp_path, grid_labels, aal3))
    r = aal3.n_regions
    rel = prepare(signals, 100)
    dyn = prepare(signals, 100, amplitude="dynamics")
    assert rel.amplitude.shape == (r,) and dyn.amplitude.shape == (4 * r,)
    assert np.array_equal(dyn.amplitude[:r], rel.amplitude)
    assert np.array_equal(dyn.amplitude,
                          regional_dynamics(signals.data, signals.tr).reshape(-1))
    with pytest.raises(InvalidInputError, match="amplitude must be 'relative' or 'dynamics'"):
        prepare(signals, 200, amplitude="alff")
