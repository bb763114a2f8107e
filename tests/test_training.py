"""Pretraining (resumable), cross-validated training, calibration, metrics, model folders."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fmmtc_core import InvalidInputError
from fmmtc_core.models.foundation import BrainLMConfig
from fmmtc_core.simulate import SimulationConfig, write_cohort
from fmmtc_core.bids import read_cohort
from fmmtc_core.models.ensemble import load_model
from fmmtc_core.preprocess import CleaningSettings, preprocessing_card
from fmmtc_core.pretraining import pretrain
from fmmtc_core.training import TrainingWarning, _splits, binary_metrics, evaluate, train

SIM = SimulationConfig(n_volumes=60, fc_effect=0.6, n_sites=4)


def _tiny_foundation_config():
    return BrainLMConfig.tiny(num_brain_voxels=166, num_timepoints_per_voxel=40,
                              timepoint_patching_size=10, num_landmarks=16,
                              attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    corpus = write_cohort(root / "corpus", 6, seed=1, fmt="timeseries", labelled=False,
                          atlas="aal3", config=SIM)
    cohort = write_cohort(root / "cohort", 24, seed=2, fmt="timeseries", atlas="aal3",
                          config=SIM)
    found = pretrain(corpus, root / "found", config=_tiny_foundation_config(), atlas="aal3",
                     epochs=2, seed=0)
    return root, corpus, cohort, found


def test_read_cohort_and_its_errors(tmp_path, data):
    _, corpus, cohort, _ = data
    c = read_cohort(cohort)
    assert c.labelled and len(c.participants) == 24
    assert all(p.name.endswith("_timeseries.tsv") for p in c.participants["scan"])
    with pytest.raises(InvalidInputError, match="has no responder column"):
        read_cohort(corpus)
    with pytest.raises(InvalidInputError, match="has no participants.tsv"):
        read_cohort(tmp_path)
    (tmp_path / "participants.tsv").write_text("participant_id\tresponder\nsub-01\tmaybe\n")
    with pytest.raises(InvalidInputError, match="responder must be 1 or 0"):
        read_cohort(tmp_path)
    (tmp_path / "participants.tsv").write_text("participant_id\tresponder\nsub-01\t1\n")
    with pytest.raises(InvalidInputError, match="No scan for sub-01"):
        read_cohort(tmp_path)


def test_pretraining_writes_a_loadable_checkpoint_and_resumes(tmp_path, data):
    root, corpus, _, found = data
    assert (found / "config.json").exists() and (found / "model.safetensors").exists()
    log = json.loads((found / "pretrain_log.json").read_text())
    assert len(log["loss_per_epoch"]) == 2 and log["loss_per_epoch"][1] < log["loss_per_epoch"][0]
    cfg = json.loads((found / "config.json").read_text())
    assert cfg["model_type"] == "brainlm_mae" and cfg["num_brain_voxels"] == 166
    # Interrupted after 1 epoch, then resumed to 2: same weights as the straight run.
    pretrain(corpus, tmp_path / "r", config=_tiny_foundation_config(), atlas="aal3",
             epochs=1, seed=0)
    pretrain(corpus, tmp_path / "r", config=_tiny_foundation_config(), atlas="aal3",
             epochs=2, seed=0)
    a, b = load_file(str(found / "model.safetensors")), load_file(str(tmp_path / "r" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_pretraining_options_region_subsets_cosine_schedule_and_resume(tmp_path, data):
    """More windows per subject, random region subsets, cosine schedule, decimetre centroids:
    recorded in the log and config, and an interrupted run, rerun with the same command, ends
    with the same weights as a straight one (the learning rate is a function of the step)."""
    _, corpus, _, _ = data
    opts = dict(config=_tiny_foundation_config(), atlas="aal3", seed=0, batch_size=4,
                windows_per_subject=2, regions_per_step=40, schedule="cosine", xyz_scale=0.01)
    straight = pretrain(corpus, tmp_path / "a", epochs=2, **opts)
    log = json.loads((straight / "pretrain_log.json").read_text())
    assert (log["windows_per_subject"], log["regions_per_step"], log["schedule"]) == (2, 40,
                                                                                      "cosine")
    assert log["steps"] == 2 * 3 and log["xyz_scale"] == 0.01  # 6 subjects x 2 windows / 4
    assert json.loads((straight / "config.json").read_text())["xyz_scale"] == 0.01

    class Interrupted(Exception):
        pass

    def stop_after_first_epoch(stage, done, total, info):
        if stage == "pretrain" and done == 1:
            raise Interrupted  # after the epoch's checkpoint was written

    with pytest.raises(Interrupted):
        pretrain(corpus, tmp_path / "b", epochs=2, progress=stop_after_first_epoch, **opts)
    resumed = pretrain(corpus, tmp_path / "b", epochs=2, **opts)  # the same command again
    a, b = (load_file(str(p / "model.safetensors")) for p in (straight, resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_cli_pretrain_order_invariant_writes_an_encoder_whose_embedding_ignores_order(
        tmp_path, data):
    """``fmmtc pretrain --order-invariant``: exact attention, no sequence convolution, in the
    folder's config.json; the loaded encoder embeds a window the same in any token order."""
    from fmmtc_core.cli import main
    from fmmtc_core.models.registry import load_encoder

    _, corpus, _, _ = data
    out = tmp_path / "enc"
    assert main(["pretrain", str(corpus), "--out", str(out), "--config", "tiny", "--atlas",
                 "aal3", "--epochs", "1", "--batch-size", "4", "--regions-per-step", "24",
                 "--order-invariant"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["attention_mode"], cfg["conv_kernel_size"]) == ("exact", None)
    enc = load_encoder(out, "cpu", atlas="aal3")
    x = torch.randn(2, 166, enc.model.config.num_timepoints_per_voxel,
                    generator=torch.Generator().manual_seed(0))
    n = 166 * enc.model.config.n_patches
    with torch.no_grad():
        natural = enc._pool_tokens(enc._forward_windows(x, None))
        shuffled = enc._pool_tokens(enc._forward_windows(
            x, torch.rand(1, n, generator=torch.Generator().manual_seed(1)).expand(2, n)))
    torch.testing.assert_close(shuffled, natural, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(windows_per_subject=0), "windows_per_subject must be a positive integer"),
    (dict(regions_per_step=1), "regions_per_step must be between 2 and the atlas's 166"),
    (dict(regions_per_step=500), "regions_per_step must be between 2 and the atlas's 166"),
    (dict(schedule="linear"), "schedule"),
    (dict(xyz_scale=0.0), "xyz_scale must be a positive number"),
])
def test_pretraining_option_errors(tmp_path, data, kwargs, message):
    _, corpus, _, _ = data
    with pytest.raises(InvalidInputError, match=message):
        pretrain(corpus, tmp_path / "x", config=_tiny_foundation_config(), atlas="aal3",
                 epochs=1, **kwargs)
    assert not (tmp_path / "x").exists()


def test_splits_keep_subjects_and_sites_apart():
    y = np.array([0, 1] * 20)
    sites = np.repeat(["a", "b", "c", "d", "e"], 8)
    splits, how = _splits(y, sites, 5, seed=0)
    assert how == "stratified, grouped by site"
    tested = np.concatenate([te for _, te in splits])
    assert sorted(tested) == list(range(40))  # every subject tested exactly once
    for tr, te in splits:
        assert not set(tr) & set(te)
        assert not set(sites[tr]) & set(sites[te])
    _, how = _splits(y, np.repeat(["a", "b"], 20), 5, seed=0)
    assert "not grouped by site" in how
    with pytest.raises(InvalidInputError, match="at least 5 participants of each class"):
        _splits(np.array([0] * 10 + [1] * 3), None, 5, seed=0)


def test_binary_metrics_by_hand():
    y = np.array([1, 1, 0, 0])
    m = binary_metrics(y, np.array([0.9, 0.4, 0.6, 0.1]))
    assert m["auc"] == 0.75 and m["sensitivity"] == 0.5 and m["specificity"] == 0.5
    assert m["mcc"] == 0.0 and m["balanced_accuracy"] == 0.5
    assert m["brier"] == pytest.approx((0.01 + 0.36 + 0.36 + 0.01) / 4)
    perfect = binary_metrics(y, np.array([1.0, 1.0, 0.0, 0.0]))
    assert perfect["mcc"] == 1.0 and perfect["ece"] == 0.0


def test_train_writes_model_folder_and_predicts(tmp_path, data):
    _, _, cohort, found = data
    out = tmp_path / "model"
    metrics = train(cohort, out, foundation=found, folds=4, atlas="aal3", epochs=15)
    assert set(metrics) >= {"auc", "mcc", "balanced_accuracy", "sensitivity", "specificity",
                            "brier", "ece", "n_subjects"}
    assert metrics["n_subjects"] == 24
    assert sorted(p.name for p in out.glob("fold_*.safetensors")) == [
        f"fold_{k}.safetensors" for k in range(4)]
    card = json.loads((out / "model_card.json").read_text())
    assert card["data"]["simulated"] is True and card["atlas"]["name"] == "AAL3"
    assert card["training"]["split"] == "stratified, grouped by site"
    assert card["calibration"]["a"] >= 0
    assert set(card["files"]) >= {"fold_0.safetensors", "baseline.safetensors"}
    # The preprocessing block is built from the settings that ran, not written by hand: the
    # encoder's whole-scan preprocessing (every 40-sample window, FC over their span).
    ens = load_model(out)
    assert card["preprocessing"] == json.loads(json.dumps(preprocessing_card(
        CleaningSettings(), ens.encoder, scaling=card["preprocessing"]["encoder"]["scaling"])))
    assert card["preprocessing"]["encoder"]["entry"] == "fmmtc" and ens.whole_scan
    # Fold files hold only what was trained: the frozen encoder is stored once.
    assert not any(k.startswith("ts_encoder.") for k in load_file(str(out / "fold_0.safetensors")))
    oof = pd.read_csv(out / "oof_predictions.tsv", sep="\t")
    assert len(oof) == 24 and oof["probability"].between(0, 1).all()
    ens = load_model(out)
    assert len(ens.models) == 4 and ens.window == 40
    pred = ens.predict_proba(np.random.default_rng(0).standard_normal((2, 166, 40)),
                       np.zeros((2, 166, 166)))
    assert pred["probability"].shape == (2,)
    assert np.all(pred["band"][:, 0] <= pred["probability"] + 1e-9)
    assert np.all(pred["probability"] <= pred["band"][:, 1] + 1e-9)
    m2 = evaluate(out, cohort)
    assert m2["n_subjects"] == 24


def test_train_argument_errors(tmp_path, data):
    _, _, cohort, _ = data
    # No --foundation: the bundled demo encoder (HCPEx), which an AAL3 cohort cannot use.
    with pytest.raises(InvalidInputError, match="bundled demo encoder.*takes 426 regions, "
                                                "but the atlas AAL3 has 166"):
        train(cohort, tmp_path / "x", atlas="aal3")
    with pytest.raises(InvalidInputError, match="repeats must be a positive integer"):
        train(cohort, tmp_path / "x", atlas="aal3", repeats=0)
    with pytest.raises(InvalidInputError, match="permutations must be a non-negative"):
        train(cohort, tmp_path / "x", atlas="aal3", permutations=-1)
    assert not (tmp_path / "x").exists()
    with pytest.raises(InvalidInputError, match="Invalid value for the 'modalities' parameter"):
        train(cohort, tmp_path / "x", atlas="aal3", modalities="mri")
    with pytest.raises(InvalidInputError, match="not an FMM-TC model folder"):
        load_model(tmp_path)


def test_fc_only_and_scratch_ablations_train(tmp_path, data):
    _, _, cohort, _ = data
    m = train(cohort, tmp_path / "fc", modalities="fc", folds=3, atlas="aal3", epochs=5)
    assert m["n_subjects"] == 24
    card = json.loads((tmp_path / "fc" / "model_card.json").read_text())
    assert card["model"]["modalities"] == "fc" and not (tmp_path / "fc" / "foundation").exists()
    m = train(cohort, tmp_path / "s", no_foundation=True, folds=3, atlas="aal3", epochs=2)
    assert load_file(str(tmp_path / "s" / "fold_0.safetensors")).keys() & {
        "ts_encoder.layernorm.weight"}
    # With a foundation folder, "no foundation" means its architecture with random weights.
    _, _, _, found = data
    train(cohort, tmp_path / "s2", foundation=found, no_foundation=True, folds=3,
          atlas="aal3", epochs=1)
    card = json.loads((tmp_path / "s2" / "model_card.json").read_text())
    assert card["model"]["foundation"] == "scratch"
    assert card["model"]["foundation_config"]["num_timepoints_per_voxel"] == 40
    trained = load_file(str(tmp_path / "s2" / "fold_0.safetensors"))
    pretrained = load_file(str(found / "model.safetensors"))
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(trained["ts_encoder." + key], pretrained["vit." + key])


def test_build_demo_model_is_labelled_simulated(tmp_path):
    from fmmtc_core.demo import DEMO_NOTE, build_demo_model

    out = tmp_path / "demo"
    metrics = build_demo_model(out, n_corpus=3, n_subjects=20, pretrain_epochs=1, epochs=2)
    assert metrics["n_subjects"] == 20
    card = json.loads((out / "model_card.json").read_text())
    assert card["intended_use"] == DEMO_NOTE and "SIMULATED" in card["intended_use"]
    assert card["data"]["simulated"] is True
    assert card["ground_truth"]["fc_labels"] and card["build_command"].startswith("fmmtc build-demo")
    assert (out / "foundation" / "model.safetensors").exists()
    assert load_model(out).atlas == "HCPEx"


def test_default_model_is_the_bundled_demo(monkeypatch, tmp_path):
    from fmmtc_core.models.ensemble import default_model_dir

    monkeypatch.delenv("FMMTC_MODEL_DIR", raising=False)
    ens = load_model()
    assert default_model_dir().name == "demo"
    assert "SIMULATED" in ens.card["intended_use"] and len(ens.models) == 5
    assert ens.atlas == "HCPEx" and ens.window == 200
    # The demo model's files are the ones its card hashes.
    import hashlib

    for name, digest in ens.card["files"].items():
        assert hashlib.sha256((default_model_dir() / name).read_bytes()).hexdigest() == digest
    monkeypatch.setenv("FMMTC_MODEL_DIR", str(tmp_path))
    with pytest.raises(InvalidInputError, match="not an FMM-TC model folder"):
        load_model()


def test_stacked_small_preset_learns_a_sparse_amplitude_effect():
    """The small preset's read-outs, set on each training fold and combined by a head fitted on
    cross-fitted features, find 3 of 30 regions whose amplitude differs, from 80 participants;
    the same code on labels that carry nothing stays near chance."""
    from sklearn.metrics import roc_auc_score

    from fmmtc_core.models.fmmtc import PRESETS, FMMTCConfig
    from fmmtc_core.training import _cross_validate, _splits

    gen = torch.Generator().manual_seed(0)
    n, r = 80, 30
    y = (np.arange(n) % 2).astype(int)
    amplitude = torch.randn(n, r, generator=gen)
    amplitude[:, :3] += 0.9 * torch.as_tensor(y)[:, None]
    fc = 0.1 * torch.randn(n, r, r, generator=gen)
    feats = {"amplitude": amplitude, "fc": (fc + fc.transpose(1, 2)) / 2}
    # the sparse amplitude read-out on the relative amplitude alone (R values): without the
    # regional dynamics, which would read 4 R
    config = FMMTCConfig(n_regions=r, ts_embedding=False,
                         **{**PRESETS["small"], "dynamics": False})
    fit_kw = {"epochs": 1, "patience": 1, "batch_size": 8, "lr": 1e-3, "device": torch.device("cpu")}
    splits, _ = _splits(y, None, 5, 0)
    run = _cross_validate(config, None, feats, y, splits, 0, fit_kw)
    # the oracle: the mean amplitude of the 3 planted regions (AUC ~0.86 in expectation)
    oracle = roc_auc_score(y, amplitude[:, :3].mean(1).numpy())
    assert roc_auc_score(y, run["oof"]) > max(0.75, oracle - 0.08)
    head = run["states"][0]["head.1.weight"][0]
    assert head[-1] > 0  # the amplitude component carries the weight
    selected = torch.stack([st["amplitude_readout.u"][0].abs() > 0.05 for st in run["states"]])
    assert selected[:, :3].float().mean() >= 0.6  # the planted regions, in most folds
    assert selected[:, 3:].sum(0).max() <= 1  # no other region more than once
    noise = np.random.default_rng(1).permutation(y)
    run = _cross_validate(config, None, feats, noise, _splits(noise, None, 5, 0)[0], 0, fit_kw)
    assert 0.25 < roc_auc_score(noise, run["oof"]) < 0.75


def test_stacked_head_keeps_the_embedding_probe_only_when_it_helps():
    """The probe column stays when it carries the outcome, and is dropped (weight 0) when it
    is noise beside an informative read-out."""
    from sklearn.model_selection import StratifiedKFold

    from fmmtc_core.training import _head_with_optional_probe

    rng = np.random.default_rng(0)
    n = 100
    y = (np.arange(n) % 2).astype(int)
    signal = y + rng.normal(0, 0.7, n)
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    noise_probe = np.column_stack([rng.normal(size=n), signal])
    w, _, _, kept = _head_with_optional_probe(noise_probe, y, cv)
    assert kept == (False,) and w[0] == 0 and w[1] > 0
    good_probe = np.column_stack([signal + rng.normal(0, 0.3, n), rng.normal(size=n)])
    w, _, _, kept = _head_with_optional_probe(good_probe, y, cv)
    assert kept == (True,) and w[0] > 0
    # two probes: each kept on its own merit
    two = np.column_stack([rng.normal(size=n), signal + rng.normal(0, 0.3, n),
                           rng.normal(size=n)])
    w, _, _, kept = _head_with_optional_probe(two, y, cv, n_probes=2)
    assert kept == (False, True) and w[0] == 0 and w[1] > 0


def test_small_preset_model_folder_reads_amplitude_and_explains_it(tmp_path, data):
    from fmmtc_core.bids import read_cohort
    from fmmtc_core.explain import explain
    from fmmtc_core.pipeline import prepare_cohort

    _, _, cohort, found = data
    out = tmp_path / "small"
    with pytest.warns(TrainingWarning, match=r"^SMALL COHORT: \d+ participants\. .*fmmtc compare"):
        train(cohort, out, foundation=found, preset="small", folds=3, atlas="aal3")
    card = json.loads((out / "model_card.json").read_text())
    assert card["model"]["amplitude"] and card["model"]["fit"] == "stacked"
    assert any(w.startswith("SMALL COHORT") for w in card["warnings"])
    fits = card["training"]["fold_fits"]
    assert len(fits) == 3 and {f["embedding"] for f in fits} <= {"used", "dropped"}
    kept = sum(f["embedding"] == "used" for f in fits)
    assert card["training"]["embedding_kept"].startswith(f"{kept} of 3 fold models")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["foundation_embedding"]["kept"] == kept
    ens = load_model(out)
    assert ens.uses_amplitude
    signals = prepare_cohort(read_cohort(cohort), "aal3")[0]
    inputs = ens.inputs(signals)
    with pytest.raises(InvalidInputError, match="reads the regional amplitude"):
        ens.predict_proba(inputs.window[None], inputs.fc[None])
    pred = ens.predict_proba(inputs.window[None], inputs.fc[None], inputs.amplitude[None])
    assert 0 <= pred["probability"][0] <= 1
    with pytest.raises(InvalidInputError, match="pass amplitude="):
        explain(ens, inputs.window, inputs.fc, atlas=None)
    e = explain(ens, inputs.window, inputs.fc, amplitude=inputs.amplitude)
    assert e.amplitude.shape == (166,) and e.settings["amplitude_attribution"]
    assert e.baseline["amplitude"] == "cohort_mean"
    # completeness over all three inputs: the gap IG reports is the whole story
    total = e.region_total.sum()
    assert abs(total - (e.logit - e.baseline_logit)) <= max(0.02 * abs(e.logit - e.baseline_logit),
                                                            2e-3)
    assert np.allclose(e.region_ts - e.ts.sum(axis=1), e.amplitude)
    # "no foundation model" in the small preset: amplitude alone carries the T modality
    train(cohort, tmp_path / "nf", preset="small", no_foundation=True, folds=3, atlas="aal3")
    card = json.loads((tmp_path / "nf" / "model_card.json").read_text())
    assert card["model"]["ts_embedding"] is False and not (tmp_path / "nf" / "foundation").exists()
    ens = load_model(tmp_path / "nf")
    assert ens.encoder is None and ens.uses_amplitude


def test_small_preset_with_dynamics_reads_4r_values_and_explains_per_region(tmp_path, data,
                                                                             monkeypatch):
    """``dynamics=True``: the amplitude input is the regional dynamics (4 R values), the
    head's probe of it is kept or dropped per fold by the inner CV, and the explanation sums a
    region's 4 values into its amplitude attribution."""
    from fmmtc_core.bids import read_cohort
    from fmmtc_core.explain import explain
    from fmmtc_core.models.fmmtc import PRESETS
    from fmmtc_core.pipeline import prepare_cohort

    _, _, cohort, found = data
    monkeypatch.setitem(PRESETS, "small", {**PRESETS["small"], "dynamics": True})
    out = tmp_path / "dyn"
    with pytest.warns(TrainingWarning, match="SMALL COHORT"):
        train(cohort, out, foundation=found, preset="small", folds=3, atlas="aal3")
    card = json.loads((out / "model_card.json").read_text())
    assert card["model"]["dynamics"] is True
    assert {f["dynamics"] for f in card["training"]["fold_fits"]} <= {"used", "dropped"}
    ens = load_model(out)
    r = 166
    signals = prepare_cohort(read_cohort(cohort), "aal3")[0]
    inputs = ens.inputs(signals)
    assert inputs.amplitude.shape == (4 * r,)
    pred = ens.predict_proba(inputs.window[None], inputs.fc[None], inputs.amplitude[None])
    assert 0 <= pred["probability"][0] <= 1
    with pytest.raises(InvalidInputError, match=r"regional dynamics: amplitude must have shape "
                                                r"\(batch, 664\)"):
        ens.predict_proba(inputs.window[None], inputs.fc[None], inputs.amplitude[None, :r])
    with pytest.raises(InvalidInputError, match=r"amplitude must have shape \(664,\) \(the "
                                                r"regional dynamics"):
        explain(ens, inputs.window, inputs.fc, amplitude=inputs.amplitude[:r])
    e = explain(ens, inputs.window, inputs.fc, amplitude=inputs.amplitude)
    assert e.amplitude.shape == (r,)
    total = e.region_total.sum()
    assert abs(total - (e.logit - e.baseline_logit)) <= max(0.02 * abs(e.logit - e.baseline_logit),
                                                            2e-3)
    # a fold whose dynamics probe is dropped puts no weight on the 4 R dynamics features
    for m, fit in zip(ens.models, card["training"]["fold_fits"]):
        w = m.head[-1].weight[0, -4 * r:]
        assert (w.abs().sum() > 0) == (fit["dynamics"] == "used")


def test_two_processes_train_the_one_process_model(tmp_path, data, monkeypatch):
    """Under torchrun (2 processes, gloo on loopback) the scans' embeddings and the fold
    models are dealt over the ranks: the folder is the one-process one, bit for bit."""
    from _ddp_worker import run_worker

    _, _, cohort, found = data
    # the gradient-trained preset (the small preset's stacked fits take ~20 s a fold here;
    # its fit notes cross processes as in test_a_fold_result_survives_its_trip)
    opts = dict(foundation=str(found), preset="default", epochs=3, folds=3, atlas="aal3",
                threads=1)
    monkeypatch.setenv("FMMTC_CACHE_DIR", str(tmp_path / "cache1"))  # both compute embeddings
    train(cohort, tmp_path / "one", **opts)
    monkeypatch.setenv("FMMTC_CACHE_DIR", str(tmp_path / "cache2"))
    run_worker(2, "train", cohort_dir=str(cohort), out_dir=str(tmp_path / "two"), **opts)
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "metrics.json").read_text() == (two / "metrics.json").read_text()
    assert (one / "oof_predictions.tsv").read_text() == (two / "oof_predictions.tsv").read_text()
    names = sorted(p.name for p in one.glob("*.safetensors"))
    assert names == sorted(p.name for p in two.glob("*.safetensors"))
    assert "fold_2.safetensors" in names
    for name in names:
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cards = [json.loads((d / "model_card.json").read_text())["training"] for d in (one, two)]
    assert cards[0]["embeddings"]["computed"] == cards[1]["embeddings"]["computed"] == 24
    assert "processes" not in cards[0] and cards[1]["processes"] == 2


def test_a_fold_result_survives_its_trip_between_processes():
    """What a rank sends the others for each fold (weights, scaled logits, scale, the stacked
    fit's notes) comes back unchanged."""
    from fmmtc_core.training import _fold_blob, _fold_from_blob

    result = {"oof": np.array([0.25, -1.5], dtype=np.float32), "scale": 0.7312345678901234,
              "state": {"head.0.weight": torch.arange(6.0).reshape(2, 3)},
              "fit_info": {"C": 0.1, "embedding": "dropped"}}
    back = _fold_from_blob(_fold_blob(result))
    assert back["oof"].tolist() == [0.25, -1.5] and back["scale"] == result["scale"]
    assert back["fit_info"] == result["fit_info"]
    assert torch.equal(back["state"]["head.0.weight"], result["state"]["head.0.weight"])
    no_info = _fold_from_blob(_fold_blob({k: v for k, v in result.items() if k != "fit_info"}))
    assert "fit_info" not in no_info and no_info["state"].keys() == result["state"].keys()
