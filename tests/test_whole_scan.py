"""The whole-scan representation (issue 13, item 3): one path from cleaned signals to the
model's inputs through a foundation encoder, the same in training, screening and explanation.

``prepare(signals, encoder)``: every window of the scan and the connectivity of the whole series
(of the windows' span for 0.1.0's cards); the scan embedding training caches equals the one screening computes; the windows' Gram
matrix; clear refusals of an atlas that is not the encoder's.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

import foundation_layouts as fl
from fmmtc_core import InvalidInputError
from fmmtc_core.atlas import load_atlas
from fmmtc_core.config import DEMO_MODEL_DIR
from fmmtc_core.connectivity import connectivity
from fmmtc_core.models.fmmtc import FMMTC, FMMTCConfig, embed_scans, scans_gram
from fmmtc_core.models.registry import load_encoder
from fmmtc_core.preprocess import (
    CleaningSettings,
    RegionSignals,
    FC_SPAN_WINDOWS,
    prepare,
    preprocessing_card,
    relative_amplitude,
    windows_gram,
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one thread is faster, and immune to a busy machine's thread contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def a424_image(path, labels=range(1, 425)):
    """A fake A424 label image: one voxel per region, labels in order (as BrainLM's)."""
    data = np.zeros((10, 10, 5), np.int16)
    flat = data.reshape(-1)
    flat[: len(labels)] = np.asarray(list(labels))
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = [-40, -40, -20]
    nib.save(nib.Nifti1Image(flat.reshape(data.shape), affine), path)
    return path


def signals_of(atlas, n=300, tr=2.0, seed=0) -> RegionSignals:
    data = np.random.default_rng(seed).standard_normal((n, atlas.n_regions)).astype(np.float32)
    data += 0.5 * data[:, :1]  # some shared signal, so the connectivity is not all ~0
    return RegionSignals(data=data, tr=tr, atlas=atlas,
                         n_voxels=np.ones(atlas.n_regions, np.int64),
                         coverage=np.ones(atlas.n_regions), cleaned=True)


@pytest.fixture(scope="module")
def a424(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole_scan")
    coords = root / "A424_Coordinates.dat"
    fl.write_a424_coordinates(coords)
    fl.write_vitmae_checkpoint(root / "vitmae", patch=16)
    image = a424_image(root / "A424.nii.gz")
    enc = load_encoder(root / "vitmae", "cpu", atlas=load_atlas(image, coordinates_file=coords))
    atlas = load_atlas(image)
    enc.fit_scaling([signals_of(atlas, seed=9).data])
    return root, atlas, enc


def test_prepare_gives_every_window_and_the_connectivity_of_the_whole_series(a424):
    _, atlas, enc = a424
    signals = signals_of(atlas, n=300, tr=2.0)
    inputs = prepare(signals, enc)
    plan = inputs.plan
    # 300 volumes at TR 2 s -> 816 samples at 0.735 s -> 4 windows of 200 = 800 samples,
    # which cover the first 800 * 0.735 / 2 = 294 volumes.
    assert (plan.n_resampled, plan.n_windows, plan.span) == (816, 4, (0, 294))
    assert inputs.window.shape == (4, 3, 424, 200) and inputs.window.dtype == np.float32
    np.testing.assert_array_equal(inputs.window, enc.windows(signals.data, 2.0).numpy())
    np.testing.assert_array_equal(inputs.fc, connectivity(signals.data))
    np.testing.assert_array_equal(inputs.amplitude, relative_amplitude(signals.data))
    # 0.1.0's whole-scan models read the span the windows cover
    old = prepare(signals, enc, fc_span="windows")
    np.testing.assert_array_equal(old.fc, connectivity(signals.data[:294]))
    np.testing.assert_array_equal(old.amplitude, relative_amplitude(signals.data[:294]))
    assert not np.allclose(old.fc, inputs.fc)
    np.testing.assert_array_equal(old.window, inputs.window)
    with pytest.raises(InvalidInputError, match="fc_span must be 'scan' or 'windows', not 'x'"):
        prepare(signals, enc, fc_span="x")
    assert prepare(signals, enc, with_fc=False).fc is None
    with pytest.raises(InvalidInputError, match="Random crops .* centred-window path"):
        prepare(signals, enc, rng=np.random.default_rng(0))


def test_project_encoders_cover_their_windows_at_native_sampling():
    enc = load_encoder(DEMO_MODEL_DIR / "foundation", "cpu")  # entry "fmmtc", HCPEx, no TR
    signals = signals_of(load_atlas("hcpex"), n=450, tr=2.0)
    inputs = prepare(signals, enc)
    assert inputs.plan.span == (0, 400) and inputs.window.shape == (2, 426, 200)
    np.testing.assert_array_equal(inputs.fc, connectivity(signals.data))


def test_a_model_reads_the_connectivity_span_its_card_records():
    """Cards written by 0.1.0's whole-scan path computed the connectivity (and amplitude) of
    the windows' span; a model keeps reading its inputs as it was trained on them."""
    import copy

    from fmmtc_core.models.ensemble import load_model

    model = load_model(DEMO_MODEL_DIR)
    signals = signals_of(load_atlas("hcpex"), n=450, tr=2.0)
    new = copy.deepcopy(model.card)
    new["preprocessing"]["connectivity"]["span"] = "the whole cleaned series"
    old = copy.deepcopy(model.card)
    old["preprocessing"]["connectivity"]["span"] = FC_SPAN_WINDOWS
    model.card = new
    assert model.fc_span == "scan"
    np.testing.assert_array_equal(model.inputs(signals).fc, connectivity(signals.data))
    model.card = old
    assert model.fc_span == "windows"
    np.testing.assert_array_equal(model.inputs(signals).fc, connectivity(signals.data[:400]))


def test_training_and_screening_embed_a_scan_alike(a424):
    """The embedding training caches (embed_cohort) is the one the deployed model computes
    from prepare()'s windows (FMMTC.embed_ts: the mean over windows of embed_windows)."""
    _, atlas, enc = a424
    signals = signals_of(atlas, n=260, tr=1.4, seed=3)
    trained = enc.embed_cohort([signals.data], [signals.tr], cache=None)[0]
    config = FMMTCConfig(n_regions=424, modalities="ts", encoder_entry=enc.entry.name)
    model = FMMTC(config, enc).eval()
    x = torch.from_numpy(prepare(signals, enc).window)
    with torch.no_grad():
        screened = model.embed_ts(x[None])[0].numpy()
        per_window = enc.embed_windows(x)
    assert x.shape[0] == 2
    np.testing.assert_allclose(screened, trained, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(screened, per_window.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    # a batch of two scans of W windows, and one window per scan (B, ...)
    with torch.no_grad():
        two = embed_scans(enc, torch.stack([x, x]))
        single = embed_scans(enc, x)
    np.testing.assert_allclose(two[1].numpy(), screened, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(single.numpy(), per_window.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(InvalidInputError, match=r"takes windows of shape \(3, 424, 200\)"):
        embed_scans(enc, torch.zeros(1, 2, 424, 200))


def test_gram_input_is_the_mean_over_windows_in_atlas_order(a424):
    _, atlas, enc = a424
    x = prepare(signals_of(atlas, n=300, tr=2.0), enc).window
    rows = x[:, 0][:, np.argsort(enc.region_index)]  # back to atlas order, one channel
    by_hand = np.mean([w @ w.T / w.shape[1] for w in rows], axis=0)
    np.testing.assert_allclose(windows_gram(enc, x), by_hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scans_gram(enc, torch.from_numpy(x)[None])[0].numpy(), by_hand,
                               rtol=1e-5, atol=1e-6)


def test_the_card_records_the_encoder_and_its_preprocessing(a424):
    _, _, enc = a424
    card = preprocessing_card(CleaningSettings(), enc, scaling={"fitted_on": "x"})
    assert card["encoder"]["entry"] == "vitmae-111m"
    assert card["encoder"]["preprocessing_hash"] == enc.preprocessing_hash
    assert card["encoder"]["preprocessing"] == enc.entry.preprocessing()
    assert set(card["encoder"]["sources"]) >= {"tr", "normalisation", "region_order", "pooling"}
    assert card["window"]["crop"] == "every non-overlapping window (whole scan)"
    assert card["connectivity"]["span"] == "the whole cleaned series"
    assert preprocessing_card(CleaningSettings(), 200)["window"]["crop"] == "centred"


def test_a_scan_in_another_atlas_is_refused(a424, tmp_path, aal3):
    _, _, enc = a424
    with pytest.raises(InvalidInputError, match="'HCPEx' has 426 regions, but encoder "
                                                "'vitmae-111m' .* expects 424 A424 regions"):
        prepare(signals_of(load_atlas("hcpex")), enc)
    shifted = load_atlas(a424_image(tmp_path / "shifted.nii.gz", range(2, 426)))
    with pytest.raises(InvalidInputError, match="not labels 1..424 in order"):
        prepare(signals_of(shifted), enc)
    demo = load_encoder(DEMO_MODEL_DIR / "foundation", "cpu")
    with pytest.raises(InvalidInputError, match="'AAL3' has 166 regions, but encoder 'fmmtc'"):
        prepare(signals_of(aal3), demo)


def test_training_refuses_an_encoder_of_another_atlas_before_any_work(a424, tmp_path):
    from fmmtc_core.simulate import SimulationConfig, write_cohort
    from fmmtc_core.training import train

    root, _, _ = a424
    cohort = write_cohort(tmp_path / "c", 4, fmt="timeseries",
                          config=SimulationConfig(n_volumes=60))
    with pytest.raises(InvalidInputError,
                       match=r"takes 424 regions, but the atlas HCPEx has 426 \(the "
                             r"encoder expects A424\): parcellate with the A424 atlas of your "
                             r"BrainLM download "
                             r"\(--atlas A424\+2mm.nii.gz --coordinates A424_Coordinates.dat\)"):
        train(cohort, tmp_path / "out", foundation=root / "vitmae", device="cpu")
    assert not (tmp_path / "out").exists()
