"""End to end with a BrainLM ViT-MAE checkpoint (issue 13: "for a random 111M-layout checkpoint,
`fmmtc train --foundation DIR` and `fmmtc screen` run end to end on a small simulated A424
cohort on this CPU").

The checkpoint is random, in the published ``vitmae_111M`` layout (stock transformers
ViT-MAE, 16-pixel patches, 432 x 432 image, 3 channels, transformers-4 parameter names, a
decoder), with 2 layers of width 32 instead of 12 of 768 so that the test takes about a minute
on 2 cores. The cohort is parcellated with a fake A424 label image and BrainLM's coordinate
table format. Everything goes through the command line, as a user would run it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sqlalchemy.orm import Session

import foundation_layouts as fl
from fmmtc_core.atlas import load_atlas
from fmmtc_core.cli import main
from fmmtc_core.models.encoder_base import FoundationEncoder
from fmmtc_core.models.ensemble import load_model
from fmmtc_core.simulate import SimulationConfig, write_cohort
from test_whole_scan import a424_image

pytestmark = pytest.mark.slow

N_SUBJECTS = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 111M-layout checkpoint, the A424 atlas files, a cohort, and a private embedding cache.

    One torch thread: tiny layers on a shared 2-core machine run far faster without thread
    contention.
    """
    root = tmp_path_factory.mktemp("e2e_foundation")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setenv("FMMTC_CACHE_DIR", str(root / "cache"))
    coords = root / "A424_Coordinates.dat"
    fl.write_a424_coordinates(coords)
    fl.write_vitmae_checkpoint(root / "vitmae_111M", patch=16, hidden=32, layers=2, heads=2)
    image = a424_image(root / "A424+2mm.nii.gz")
    # TR 2 s, 150 volumes: resampled to 0.735 s -> 408 samples -> 2 windows per scan.
    cohort = write_cohort(root / "cohort", N_SUBJECTS, seed=5, fmt="timeseries",
                          atlas=load_atlas(image), config=SimulationConfig(n_volumes=150))
    # The sidecars name the atlas by its file, as a table from a user's A424 parcellation does
    # (write_cohort writes the atlas's name, which only a bundled atlas resolves).
    for side in cohort.glob("sub-*/func/*_timeseries.json"):
        meta = json.loads(side.read_text())
        side.write_text(json.dumps(meta | {"Atlas": str(image)}))
    yield {"root": root, "coords": coords, "image": image, "cohort": cohort,
           "foundation": root / "vitmae_111M"}
    mp.undo()
    torch.set_num_threads(threads)


def _train(s, out) -> dict:
    """``fmmtc train`` of the cohort with the checkpoint; the model card."""
    code = main(["train", str(s["cohort"]), "--out", str(out), "--foundation",
                 str(s["foundation"]), "--atlas", str(s["image"]), "--coordinates",
                 str(s["coords"]), "--folds", "3", "--epochs", "3", "--preset", "small",
                 "--threads", "1"])
    assert code == 0  # the error line is in the captured stderr
    return json.loads((out / "model_card.json").read_text())


@pytest.fixture(scope="module")
def trained(setup):
    out = setup["root"] / "model"
    return out, _train(setup, out)


def test_train_writes_a_whole_scan_model_with_its_encoder_files(setup, trained):
    out, card = trained
    assert card["atlas"]["name"] == "A424+2mm" and card["atlas"]["n_regions"] == 424
    assert card["atlas"]["source"] == str(setup["image"].resolve())
    enc_card = card["preprocessing"]["encoder"]
    assert enc_card["entry"] == "vitmae-111m" and enc_card["precision"] == "fp32"
    assert enc_card["preprocessing"]["window_pooling"] == "mean"
    assert enc_card["preprocessing"]["tr"] == 0.735 and enc_card["preprocessing"]["channels"] == 3
    assert {"tr", "normalisation", "region_order", "padding", "pooling"} <= set(
        enc_card["sources"])
    assert enc_card["scaling"]["fitted_on"].startswith("this training cohort")
    assert enc_card["scaling"]["n_scans"] == N_SUBJECTS
    assert card["preprocessing"]["connectivity"]["span"] == "the whole cleaned series"
    assert card["model"]["encoder_entry"] == "vitmae-111m"
    assert card["model"]["encoder_hash"] == enc_card["preprocessing_hash"]
    emb = card["training"]["embeddings"]
    assert (emb["scans"], emb["windows"], emb["computed"], emb["cached"]) == (
        N_SUBJECTS, 2 * N_SUBJECTS, N_SUBJECTS, 0)
    # The checkpoint's own files, unchanged, with the fitted statistics and the coordinates,
    # every one hashed in the card.
    assert set(card["files"]) == {
        "fold_0.safetensors", "fold_1.safetensors", "fold_2.safetensors",
        "baseline.safetensors", "foundation/config.json", "foundation/model.safetensors",
        "foundation/robust_scaling.json", "foundation/A424_Coordinates.dat"}
    for name in ("config.json", "model.safetensors"):
        assert (out / "foundation" / name).read_bytes() == (setup["foundation"] / name
                                                              ).read_bytes()
    assert (out / "foundation" / "A424_Coordinates.dat").read_bytes() == setup[
        "coords"].read_bytes()
    ens = load_model(out, device="cpu")
    assert ens.whole_scan and isinstance(ens.encoder, FoundationEncoder)
    assert ens.encoder.entry.name == "vitmae-111m" and ens.window == 200
    assert ens.encoder.preprocessing_hash == enc_card["preprocessing_hash"]
    assert ens.atlas == str(setup["image"].resolve())


def test_screen_stores_the_screening_of_an_a424_scan(setup, trained, tmp_path, capsys):
    from fmmtc_core.preprocess import RegionSignals
    from fmmtc_core.store import open_database
    from fmmtc_core.store.models import Scan, Screening
    from fmmtc_core.store.repository import decode_series

    out, _ = trained
    db = f"sqlite:///{tmp_path / 'screen.db'}"
    scan = sorted(setup["cohort"].glob("sub-001/func/*_seg-*_timeseries.tsv"))[0]
    code = main(["screen", str(scan), "--model", str(out), "--db", db, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert 0 <= result["probability"] <= 1 and result["participant_id"] == "001"
    assert result["ig_gap"] <= 0.01 and result["modality_share"]["ts"] > 0
    with Session(open_database(db)) as s:
        row = s.query(Screening).one()
        stored = s.query(Scan).one()
        assert row.probability == pytest.approx(result["probability"])
        assert stored.atlas and stored.n_regions == 424 and row.explanation
        series = decode_series(stored.series)
        tr = stored.tr
    # The stored series reproduce the prediction through the one path (ens.inputs).
    ens = load_model(out, device="cpu")
    atlas = load_atlas(ens.atlas)
    signals = RegionSignals(data=series, tr=tr, atlas=atlas, n_voxels=-np.ones(424, np.int64),
                            coverage=np.ones(424), cleaned=True)
    inputs = ens.inputs(signals)
    # 150 volumes at TR 2 s -> 408 samples at 0.735 s -> 2 windows, volumes 0..146
    assert inputs.window.shape == (2, 3, 424, 200) and inputs.plan.span == (0, 147)
    p = ens.predict_proba(inputs.window[None], inputs.fc[None],
                          inputs.amplitude[None])["probability"][0]
    assert p == pytest.approx(result["probability"], rel=1e-5)


def test_explanation_maps_window_attributions_to_regions(setup, trained, monkeypatch):
    from fmmtc_core import explain as explain_mod
    from fmmtc_core.screening import analyse

    out, _ = trained
    ens = load_model(out, device="cpu")
    scan = sorted(setup["cohort"].glob("sub-002/func/*_seg-*_timeseries.tsv"))[0]
    a = analyse(scan, ens, explain_kwargs={"steps": (8, 16)})
    e = a.explanation
    assert e.ts.shape == (424, 400)  # 2 windows of 200, end to end, atlas order
    assert e.settings["ts_attribution"] is True
    total = e.region_total.sum()
    assert abs(total - (e.logit - e.baseline_logit)) <= max(0.01 * abs(e.logit - e.baseline_logit),
                                                            1e-4)
    # An encoder too large for IG on this device: the time series is held at the scan.
    monkeypatch.setitem(explain_mod.TS_IG_MAX_PARAMETERS, "cpu", 10)
    held = explain_mod.explain(ens, a.window, a.fc, steps=(8, 16), amplitude=a.amplitude)
    assert held.ts is None and held.baseline["ts"] == "held at the scan (not attributed)"
    # what remains of the time-series modality is the regional amplitude (small preset)
    amp = np.abs(held.amplitude).sum() if held.amplitude is not None else 0.0
    assert "above" in held.settings["ts_note"] and held.modality_share["ts"] == pytest.approx(
        amp / (amp + np.abs(held.fc).sum()))
    assert held.logit == pytest.approx(e.logit, rel=1e-5)
    assert abs(held.region_total.sum() - (held.logit - held.baseline_logit)) <= max(
        0.01 * abs(held.logit - held.baseline_logit), 1e-4)


def test_retraining_reads_every_embedding_from_the_cache(setup, trained, monkeypatch):
    _, first = trained

    def never(self, x):
        raise AssertionError("an embedding was recomputed")

    monkeypatch.setattr(FoundationEncoder, "embed_windows", never)
    out = setup["root"] / "model_again"
    card = _train(setup, out)
    emb = card["training"]["embeddings"]
    assert (emb["computed"], emb["cached"]) == (0, N_SUBJECTS)
    assert card["preprocessing"]["encoder"]["preprocessing_hash"] == first["preprocessing"][
        "encoder"]["preprocessing_hash"]
    assert card["metrics_out_of_fold"]["auc"] == first["metrics_out_of_fold"]["auc"]
    shutil.rmtree(out)
