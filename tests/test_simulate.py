"""Simulation: determinism, measurable planted effects, rendering, BIDS cohort layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import GRID_AFFINE, GRID_SHAPE

from fmmtc_core import InvalidInputError
from fmmtc_core.connectivity import fisher_z
from fmmtc_core.io import load_scan
from fmmtc_core.preprocess import parcellate, robust_scale
from fmmtc_core.simulate import (
    SimulationConfig,
    planted_regions,
    render_nifti,
    simulate_subject,
    write_cohort,
    write_nifti,
)

CFG = SimulationConfig(n_volumes=150)


def _subject(aal3, i, responder, cfg=CFG):
    return simulate_subject(aal3, responder=responder, site=i % 3, config=cfg,
                            rng=np.random.default_rng(i))


def test_deterministic_by_seed(aal3):
    a, b = _subject(aal3, 3, True), _subject(aal3, 3, True)
    np.testing.assert_array_equal(a.signals, b.signals)
    pd.testing.assert_frame_equal(a.confounds, b.confounds)
    assert not np.array_equal(a.signals, _subject(aal3, 4, True).signals)
    assert a.signals.shape == (150, aal3.n_regions) and a.signals.dtype == np.float32


@pytest.mark.parametrize("name", ["aal3", "hcpex"])
def test_a_corrected_anatomy_changes_no_simulated_subject(name):
    """The generator's coupling modules are frozen (atlas.voted_lobes): relabelling the atlas's
    lobes, as the HCP-MMP anatomy fix did, leaves every simulated cohort and the demo model's
    training data as they were."""
    from dataclasses import replace

    from fmmtc_core.atlas import load_atlas

    atlas = load_atlas(name)
    relabelled = replace(atlas, groups=("Frontal",) * atlas.n_regions, _grid_cache={})
    cfg = SimulationConfig(n_volumes=60)
    from fmmtc_core import simulate

    a = simulate_subject(atlas, responder=True, config=cfg, rng=np.random.default_rng(1))
    simulate._COUPLING_CACHE.clear()  # the coupling is built again, from the relabelled atlas
    b = simulate_subject(relabelled, responder=True, config=cfg, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a.signals, b.signals)


def test_planted_regions_are_disjoint_named_and_stable(aal3):
    p = planted_regions(aal3, CFG, seed=0)
    assert len(p["fc_labels"]) == 8 and len(p["ts_labels"]) == 8
    assert not set(p["fc_labels"]) & set(p["ts_labels"])
    assert any("Insula" in n for n in p["fc_names"])  # pain-related choice where names allow
    assert planted_regions(aal3, CFG, seed=0) == p
    big = SimulationConfig(n_fc_regions=100, n_ts_regions=100)
    with pytest.raises(InvalidInputError, match="Cannot plant 100 \\+ 100 regions"):
        planted_regions(aal3, big)


@pytest.fixture(scope="module")
def groups(aal3):
    """Robust-scaled FC and lag-1 autocorrelation of 24 responders and 24 non-responders."""
    out = {True: [], False: []}
    for i in range(48):
        resp = bool(i % 2)
        x = robust_scale(_subject(aal3, i, resp).signals)
        fc = fisher_z(np.corrcoef(x.T))
        ac = np.array([np.corrcoef(x[:-1, j], x[1:, j])[0, 1] for j in range(x.shape[1])])
        out[resp].append((fc, ac))
    return out


def test_planted_connectivity_effect_is_measurable_and_local(aal3, groups):
    from scipy.stats import ttest_ind

    fc_idx = np.array(planted_regions(aal3, CFG)["fc_index"])
    iu = np.triu_indices(len(fc_idx), 1)
    planted = {r: [f[np.ix_(fc_idx, fc_idx)][iu].mean() for f, _ in groups[r]] for r in groups}
    diff = np.mean(planted[True]) - np.mean(planted[False])
    assert diff > 0.04
    assert ttest_ind(planted[True], planted[False]).pvalue < 1e-4
    mean_r = np.mean([f for f, _ in groups[True]], axis=0)
    mean_n = np.mean([f for f, _ in groups[False]], axis=0)
    mask = np.ones((aal3.n_regions, aal3.n_regions), bool)
    mask[np.ix_(fc_idx, fc_idx)] = False
    mask &= np.triu(np.ones_like(mask), 1).astype(bool)
    elsewhere = (mean_r - mean_n)[mask].mean()
    assert abs(elsewhere) < 0.3 * diff  # the effect is concentrated on the planted edges


def test_planted_temporal_effect_survives_robust_scaling(aal3, groups):
    ts_idx = np.array(planted_regions(aal3, CFG)["ts_index"])
    ac_r = np.mean([a for _, a in groups[True]], axis=0)
    ac_n = np.mean([a for _, a in groups[False]], axis=0)
    planted = (ac_r - ac_n)[ts_idx].mean()
    others = np.delete(ac_r - ac_n, ts_idx)
    assert planted > 0.02
    assert planted > others.mean() + 3 * others.std()


def test_unlabelled_subjects_have_no_planted_effect(aal3):
    a = simulate_subject(aal3, responder=None, config=CFG, rng=np.random.default_rng(1))
    b = simulate_subject(aal3, responder=False, config=CFG, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a.signals, b.signals)


def test_confounds_have_fmriprep_columns_and_spikes(aal3):
    cfg = SimulationConfig(n_volumes=150, spike_rate=0.05)
    s = simulate_subject(aal3, responder=False, config=cfg, rng=np.random.default_rng(5))
    c = s.confounds
    assert len(c) == 150 and np.isnan(c["framewise_displacement"].iloc[0])
    for col in ("trans_x", "rot_z_derivative1_power2", "csf", "white_matter", "global_signal",
                "std_dvars", "cosine00"):
        assert col in c
    assert s.spikes.size > 0
    fd = c["framewise_displacement"].to_numpy()
    assert np.nanmedian(fd[s.spikes]) > 0.5 > np.nanmedian(fd)


def test_rendered_image_parcellates_back_to_the_signals(tmp_path, aal3, grid_labels):
    s = _subject(aal3, 0, True)
    img = render_nifti(s.signals, aal3, shape=GRID_SHAPE, affine=GRID_AFFINE, tr=2.0,
                       rng=np.random.default_rng(0))
    assert img.shape == (*GRID_SHAPE, 150)
    assert img.header.get_zooms()[3] == pytest.approx(2.0)
    path = tmp_path / "r.nii.gz"
    nib.save(img, path)
    back = parcellate(load_scan(path), aal3).data
    present = np.flatnonzero(grid_labels.n_voxels >= 3)
    r = [np.corrcoef(back[:, j], s.signals[:, j])[0, 1] for j in present]
    assert np.median(r) > 0.97


def test_streamed_writer_equals_in_memory_render(tmp_path, aal3):
    s = _subject(aal3, 1, False)
    kw = dict(shape=GRID_SHAPE, affine=GRID_AFFINE, tr=1.5)
    for ext, dtype in (("nii", "float32"), ("nii.gz", "int16")):
        mem = render_nifti(s.signals, aal3, dtype=dtype, rng=np.random.default_rng(2), **kw)
        path = write_nifti(tmp_path / f"w.{ext}", s.signals, aal3, dtype=dtype,
                           rng=np.random.default_rng(2), **kw)
        disk = nib.load(path)
        assert disk.get_data_dtype() == np.dtype(dtype)
        np.testing.assert_allclose(disk.get_fdata(), mem.get_fdata(), rtol=1e-5, atol=1e-3)
        assert disk.header.get_zooms()[3] == pytest.approx(1.5)
        assert int(disk.header["sform_code"]) == 4
    # int16 reconstructs the float image to within half a quantisation step.
    f = render_nifti(s.signals, aal3, dtype="float32", rng=np.random.default_rng(2), **kw)
    i = render_nifti(s.signals, aal3, dtype="int16", rng=np.random.default_rng(2), **kw)
    slope = i.dataobj.slope  # nibabel moves the scaling from the header to the proxy
    assert np.abs(i.get_fdata() - f.get_fdata()).max() <= slope / 2 + 1e-3
    assert not list(tmp_path.glob(".*.part"))


@pytest.mark.parametrize("fmt", ["nifti", "timeseries"])
def test_write_cohort_layout(tmp_path, aal3, fmt):
    cfg = SimulationConfig(n_volumes=60)
    root = write_cohort(tmp_path / "c", 4, seed=3, fmt=fmt, atlas="aal3", config=cfg,
                        shape=GRID_SHAPE, affine=GRID_AFFINE)
    parts = pd.read_csv(root / "participants.tsv", sep="\t")
    assert list(parts.columns) == ["participant_id", "responder", "site", "drug"]
    assert sorted(parts["responder"]) == [0, 0, 1, 1]
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["Simulated"] is True and desc["DatasetType"] == "derivative"
    truth = json.loads((root / "simulation.json").read_text())
    p = planted_regions(aal3, cfg, seed=3)
    assert truth["planted"]["fc_labels"] == p["fc_labels"]
    assert truth["planted"]["ts_names"] == p["ts_names"]
    func = root / "sub-001" / "func"
    conf = func / "sub-001_task-rest_desc-confounds_timeseries.tsv"
    if fmt == "nifti":
        bold = next(func.glob("*_desc-preproc_bold.nii.gz"))
        scan = load_scan(bold, confounds=conf)  # sidecar found beside the image
        assert scan.tr == 2.0 and scan.shape == (*GRID_SHAPE, 60)
    else:
        table = next(func.glob("*_seg-AAL3_timeseries.tsv"))
        assert pd.read_csv(table, sep="\t").columns.tolist() == list(aal3.names)
        scan = load_scan(table)
        assert scan.kind == "table" and scan.atlas_name == "AAL3" and scan.tr == 2.0


def test_confounds_load_with_nilearn_presets(tmp_path):
    from nilearn.interfaces.fmriprep import load_confounds_strategy

    cfg = SimulationConfig(n_volumes=60, spike_rate=0.05)
    root = write_cohort(tmp_path / "c", 2, seed=1, atlas="aal3", config=cfg,
                        shape=GRID_SHAPE, affine=GRID_AFFINE)
    bold = next((root / "sub-001" / "func").glob("*_bold.nii.gz"))
    conf, mask = load_confounds_strategy(str(bold), denoise_strategy="simple")
    assert conf.shape[0] == 60 and "trans_x" in conf and "csf" in conf
    conf, mask = load_confounds_strategy(str(bold), denoise_strategy="scrubbing")
    assert conf.shape[0] == 60


def test_unlabelled_corpus_varies_tr(tmp_path):
    root = write_cohort(tmp_path / "u", 6, seed=2, fmt="timeseries", labelled=False,
                        atlas="aal3", config=SimulationConfig(n_volumes=60))
    parts = pd.read_csv(root / "participants.tsv", sep="\t")
    assert "responder" not in parts
    trs = {json.loads(p.read_text())["RepetitionTime"]
           for p in root.glob("sub-*/func/*_timeseries.json")}
    assert len(trs) > 1
    assert json.loads((root / "simulation.json").read_text())["planted"] is None


def test_argument_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="at least 2 subjects, got 1"):
        write_cohort(tmp_path / "x", 1)
    with pytest.raises(InvalidInputError, match="Invalid value for the 'fmt' parameter"):
        write_cohort(tmp_path / "x", 2, fmt="dicom")
    with pytest.raises(InvalidInputError, match="n_volumes must be at least 10"):
        simulate_subject("aal3", responder=True, config=SimulationConfig(n_volumes=3))
    root = write_cohort(tmp_path / "y", 2, fmt="timeseries", atlas="aal3",
                        config=SimulationConfig(n_volumes=60))
    with pytest.raises(InvalidInputError, match="already holds a cohort"):
        write_cohort(root, 2)


# --------------------------------------------------------------------------------------------
# Presets: easy (the original generator), realistic, shifted and heldout (held out)
# --------------------------------------------------------------------------------------------
def test_presets_are_named_validated_and_easy_is_the_default():
    from fmmtc_core.simulate import PRESETS

    assert set(PRESETS) == {"easy", "realistic", "shifted", "heldout"}
    assert SimulationConfig.preset("easy") == SimulationConfig()
    real = SimulationConfig.preset("realistic", n_fc_regions=4)
    assert real.n_fc_regions == 4 and real.site_count() == 3 == len(real.site_tr)
    # the held-out generator differs in sites, effect shapes and noise
    shifted = PRESETS["shifted"]
    assert shifted.site_tr != real.site_tr and shifted.fc_effect_kind != real.fc_effect_kind
    assert shifted.ts_tau_s != real.ts_tau_s
    # the second held-out generator: other sites again, and a temporal effect of another kind
    heldout = PRESETS["heldout"]
    assert heldout.site_count() == 2 and set(heldout.site_tr).isdisjoint(
        set(real.site_tr) | set(shifted.site_tr))
    assert heldout.ts_effect_kind not in {real.ts_effect_kind, shifted.ts_effect_kind}
    assert heldout.latent_dt is not None  # the effect is defined in seconds, like theirs
    with pytest.raises(InvalidInputError, match="Invalid value for the 'preset' parameter"):
        SimulationConfig.preset("hard")


@pytest.mark.parametrize("overrides, message", [
    ({"site_tr": (1.0, 2.0), "site_minutes": (5.0,)}, "one entry per site"),
    ({"n_sites": 2, "site_tr": (1.0, 2.0, 3.0)}, "n_sites is 2 but the per-site tuples"),
    ({"label_noise": 0.5}, "label_noise must be in .* below 0.5"),
    ({"effect_prevalence": 1.5}, "effect_prevalence must be in"),
    ({"site_responder_rate": (0.0, 0.5, 0.5)}, "site_responder_rate values must be in"),
    ({"ts_effect": -0.1}, "ts_effect_kind='ou' needs ts_effect >= 0"),
    ({"fc_effect_kind": "ring"}, "Invalid value for the 'fc_effect_kind' parameter"),
    ({"latent_dt": 5.0}, "latent_dt must be between"),
])
def test_preset_knob_errors(overrides, message):
    with pytest.raises(InvalidInputError, match=message):
        SimulationConfig.preset("realistic", **overrides)


def test_realistic_cohort_sites_heterogeneity_and_truth(tmp_path, aal3):
    cfg = SimulationConfig.preset("realistic", site_minutes=(1.0, 1.0, 1.5), label_noise=0.3,
                                  effect_prevalence=0.5)
    root = write_cohort(tmp_path / "r", 24, seed=5, fmt="timeseries", atlas="aal3", config=cfg)
    parts = pd.read_csv(root / "participants.tsv", sep="\t")
    truth = json.loads((root / "simulation.json").read_text())
    subjects = pd.DataFrame(truth["subjects"])
    assert list(subjects["participant_id"]) == list(parts["participant_id"])
    assert (subjects["responder_label"] == parts["responder"]).all()
    # each site scans at its own TR and length, and the sidecars say so
    for _, row in parts.iterrows():
        site = int(row["site"].removeprefix("site")) - 1
        side = next((root / row["participant_id"] / "func").glob("*_timeseries.json"))
        assert json.loads(side.read_text())["RepetitionTime"] == cfg.site_tr[site]
        sub = subjects.set_index("participant_id").loc[row["participant_id"]]
        assert sub["n_volumes"] == round(cfg.site_minutes[site] * 60 / cfg.site_tr[site])
    # recorded labels differ from the simulated biology for some participants (label noise),
    # and some biological responders carry only one effect or none (heterogeneity)
    assert (subjects["responder_label"] != subjects["responder_biology"]).any()
    carriers = subjects[subjects["responder_biology"] == 1]
    assert any(len(e) < 2 for e in carriers["effects"])
    assert all(e == [] for e in subjects[subjects["responder_biology"] == 0]["effects"])
    assert parts["responder"].value_counts().min() >= 2


def _band_power_ratio(x, tr):
    from scipy.signal import welch

    f, p = welch(x, fs=1 / tr, nperseg=min(len(x), int(100 / tr)), axis=0)
    return np.log(p[(f >= 0.01) & (f < 0.04)].sum(0) / p[(f >= 0.04) & (f <= 0.1)].sum(0))


@pytest.mark.parametrize("tr", [0.8, 2.0])
def test_ou_temporal_effect_is_slower_fluctuations_at_any_tr(aal3, tr):
    cfg = SimulationConfig.preset("realistic", site_tr=(), site_minutes=(), site_share=(),
                                  site_responder_rate=(), n_sites=1, tr=tr,
                                  n_volumes=int(600 / tr), ts_effect=2.0, effect_sd=0.0)
    ts = np.array(planted_regions(aal3, cfg)["ts_index"])
    ratio = {}
    for resp in (True, False):
        subj = [simulate_subject(aal3, responder=resp, config=cfg,
                                 rng=np.random.default_rng(i)) for i in range(4)]
        ratio[resp] = np.mean([_band_power_ratio(s.signals, tr) for s in subj], axis=0)
    diff = ratio[True] - ratio[False]
    assert diff[ts].mean() > 0.2  # more power below 0.04 Hz in the planted regions
    assert abs(np.delete(diff, ts).mean()) < 0.1 * diff[ts].mean()  # and nowhere else


@pytest.mark.parametrize("tr", [0.5, 2.2])
def test_heldout_ar_effect_is_slower_dynamics_of_the_planted_regions_at_its_trs(aal3, tr):
    """The held-out preset's temporal effect (more self-coupling on the fixed 0.5 s latent
    grid): higher lag-1 autocorrelation in the planted regions of responders at both sites'
    TRs, and not elsewhere."""
    cfg = SimulationConfig.preset("heldout", site_tr=(), site_minutes=(), site_share=(),
                                  site_responder_rate=(), n_sites=1, tr=tr,
                                  n_volumes=int(480 / tr), effect_sd=0.0, ts_effect=0.3)
    ts = np.array(planted_regions(aal3, cfg)["ts_index"])

    def ac1(x):
        x = x - x.mean(0)
        return (x[1:] * x[:-1]).sum(0) / (x * x).sum(0)

    mean_ac = {}
    for resp in (True, False):
        subj = [simulate_subject(aal3, responder=resp, config=cfg,
                                 rng=np.random.default_rng(i)) for i in range(4)]
        mean_ac[resp] = np.mean([ac1(s.signals) for s in subj], axis=0)
    diff = mean_ac[True] - mean_ac[False]
    assert diff[ts].mean() > 0.02
    assert abs(np.delete(diff, ts).mean()) < 0.25 * diff[ts].mean()


def test_one_subject_written_alone_is_the_same_as_in_the_whole_cohort(tmp_path):
    """The demo job writes one subject at a time (to screen each as soon as it exists): each
    must be bit for bit the subject the whole cohort holds, with the same row."""
    from fmmtc_core.simulate import SimulationConfig, write_cohort

    cfg = SimulationConfig(n_volumes=60)
    whole = write_cohort(tmp_path / "whole", 3, seed=5, fmt="timeseries", config=cfg)
    alone = write_cohort(tmp_path / "alone", 3, seed=5, fmt="timeseries", config=cfg,
                         subjects=[1])
    name = "sub-002/func/sub-002_task-rest_space-MNI152NLin2009cAsym_seg-HCPEx_timeseries.tsv"
    assert (alone / name).read_bytes() == (whole / name).read_bytes()
    rows = pd.read_csv(alone / "participants.tsv", sep="\t")
    expected = pd.read_csv(whole / "participants.tsv", sep="\t").iloc[[1]]
    pd.testing.assert_frame_equal(rows, expected.reset_index(drop=True))
    assert not (alone / "sub-001").exists()
    with pytest.raises(InvalidInputError, match=r"subjects must be positions 0 to 2 of the "
                                                r"cohort, got \[3\]"):
        write_cohort(tmp_path / "bad", 3, seed=5, fmt="timeseries", config=cfg, subjects=[3])
    assert not (tmp_path / "bad").exists()
