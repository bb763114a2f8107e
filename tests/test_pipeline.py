"""One path from a scan to the model: load -> parcellate -> QC -> clean (pipeline) and cleaned
signals -> model inputs (preprocess.prepare), the same for training, screening and QC."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial

import numpy as np
import torch
import pytest
from conftest import fmriprep_confounds, make_bold, save_nifti

from fmmtc_core._errors import QCFailedError
from fmmtc_core.bids import read_cohort
from fmmtc_core.pipeline import load_and_clean, prepare_cohort
from fmmtc_core.preprocess import CleaningSettings, make_window, prepare, preprocessing_card
from fmmtc_core.qc import QCThresholds, assess_scan, qc_report
from fmmtc_core.simulate import SimulationConfig, write_cohort


@pytest.fixture(scope="module")
def model():
    from fmmtc_core.models.ensemble import load_model

    return load_model()


def test_training_and_screening_give_the_model_the_same_inputs(tmp_path, model):
    """The inputs train() and evaluate() stack for a participant are, bit for bit, those
    analyse() gives the model for the same scan."""
    from fmmtc_core.preprocess import prepare
    from fmmtc_core.screening import analyse
    from fmmtc_core.training import _encoder_features, _stack_inputs

    cohort = read_cohort(write_cohort(tmp_path / "c", 2, seed=3, fmt="timeseries",
                                      config=SimulationConfig(n_volumes=260)),
                         require_labels=False)
    signals = prepare_cohort(cohort, model.atlas)
    kind = model.models[0].config.amplitude_kind  # what train() asks prepare() for
    if model.whole_scan:  # train()'s encoder path: whole scans through the frozen encoder
        feats, _, _ = _encoder_features(model.encoder, signals, gram=False, cohort_name="c",
                                        progress=None, amplitude=kind)
        windows = [prepare(s, model.encoder).window for s in signals]
        fc, amplitude, embedding = feats["fc"], feats["amplitude"], feats["ts"]
    else:  # older models: the centred window
        windows, fc, amplitude = _stack_inputs(signals, model.window, kind)
        embedding = None
    for i, row in enumerate(cohort.participants.itertuples()):
        # As screen_batch screens a cohort: with its confounds.
        screened = analyse(row.scan, model, confounds=row.confounds, with_explanation=False)
        np.testing.assert_array_equal(screened.signals.data, signals[i].data)
        np.testing.assert_array_equal(screened.window, windows[i])
        np.testing.assert_array_equal(screened.fc, fc[i])
        np.testing.assert_array_equal(screened.amplitude, amplitude[i])
        assert screened.window.dtype == windows[i].dtype == np.float32
        if embedding is not None:  # the embedding training stored is the one screening uses
            with torch.no_grad():
                emb = model.models[0].embed_ts(torch.from_numpy(screened.window)[None])
            np.testing.assert_allclose(emb[0].numpy(), embedding[i], rtol=1e-5, atol=1e-6)
        assert screened.fold_probabilities == pytest.approx(
            model.fold_probabilities(model.predict_proba(
                np.asarray(windows[i])[None], fc[i:i + 1], amplitude[i:i + 1])
                ["fold_logits"][:, 0]).tolist())


def test_prepare_crops_centred_or_at_random(tmp_path):
    cohort = read_cohort(write_cohort(tmp_path / "c", 2, seed=4, fmt="timeseries",
                                      atlas="aal3", config=SimulationConfig(n_volumes=80)),
                         require_labels=False)
    signals = prepare_cohort(cohort, "aal3")[0]
    centred = prepare(signals, 40)
    assert centred.window.shape == (166, 40) and centred.fc.shape == (166, 166)
    np.testing.assert_array_equal(centred.window, make_window(signals, 40, start=20))
    start = int(np.random.default_rng(7).integers(0, 80 - 40 + 1))
    cropped = prepare(signals, 40, rng=np.random.default_rng(7), with_fc=False)
    assert cropped.fc is None
    np.testing.assert_array_equal(cropped.window, make_window(signals, 40, start=start))
    # A series no longer than the window is never cropped and draws nothing.
    rng = np.random.default_rng(7)
    np.testing.assert_array_equal(prepare(signals, 100, rng=rng).window,
                                  prepare(signals, 100).window)
    assert rng.integers(0, 1000) == np.random.default_rng(7).integers(0, 1000)


def test_preprocessing_card_is_built_from_the_settings():
    settings = CleaningSettings(scrub=True, low_pass=0.08)
    card = preprocessing_card(settings, 120)
    assert card["cleaning"] == asdict(settings)
    assert card["window"]["length"] == 120 and card["window"]["crop"] == "centred"
    assert card["connectivity"] == {"kind": "correlation", "shrinkage": False, "fisher": True}


def test_the_pipeline_cleans_with_the_settings_given_and_times_its_stages(tmp_path,
                                                                        grid_labels, aal3):
    bold = save_nifti(tmp_path / "sub-p_bold.nii.gz", make_bold(grid_labels, 60))
    conf = tmp_path / "sub-p_desc-confounds_timeseries.tsv"
    fmriprep_confounds(60).to_csv(conf, sep="\t", index=False, na_rep="n/a")
    events = []
    prep = load_and_clean(bold, aal3, confounds=conf,
                          qc=partial(qc_report, thresholds=QCThresholds(uncovered_warn=0.5)),
                          cleaning=CleaningSettings(high_pass=0.02),
                          progress=lambda stage, done, total, info: events.append(stage))
    assert list(dict.fromkeys(events)) == ["validate", "parcellate", "qc", "clean"]
    assert set(prep.stage_seconds) == {"load", "parcellate", "qc", "clean"}
    assert prep.qc.verdict == "pass" and not prep.raw.cleaned
    assert prep.signals.cleaned and prep.signals.cleaning["high_pass"] == 0.02
    assert prep.signals.cleaning["strategy"] == "simple"


def test_a_failed_scan_is_reported_but_never_cleaned(tmp_path, grid_labels, aal3):
    bold = save_nifti(tmp_path / "sub-q_bold.nii.gz", make_bold(grid_labels, 60))
    conf = tmp_path / "sub-q_desc-confounds_timeseries.tsv"
    fmriprep_confounds(60, fd_scale=3.0).to_csv(conf, sep="\t", index=False, na_rep="n/a")
    with pytest.raises(QCFailedError, match="failed quality control") as e:
        load_and_clean(bold, aal3, confounds=conf, qc=qc_report)
    assert e.value.report.verdict == "fail"
    # The scan-quality check (no cleaning) hands the same report back instead.
    calls = []
    scan, raw, report = assess_scan(bold, confounds=conf, atlas=aal3,
                                    progress=lambda done, total: calls.append((done, total)))
    assert report.verdict == "fail" and not raw.cleaned and scan.kind == "nifti"
    assert calls and calls[-1] == (60, 60)
