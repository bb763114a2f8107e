"""Golden tests of the ViT-MAE BrainLM layouts (vitmae-111m, vitmae-650m).

Each test writes a tiny random checkpoint in the published layout (stock transformers
``ViTMAEForPreTraining``, parameter names of transformers 4, a ``config.json`` like BrainLM's)
and compares the project's embedding with a reference computed independently in
``foundation_layouts``: brainmarks' preprocessing written out (global robust scaling, / 5.643,
linear resampling to 0.735 s, mean padding, non-overlapping windows, stable Y order, 3 channels),
the BrainLM padding (-1, symmetric halves) and transformers' own ``from_pretrained`` of the
stock model, with random token shuffles as the reference does at every call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import foundation_layouts as fl
from fmmtc_core import InvalidInputError
from fmmtc_core.models.registry import load_encoder
from fmmtc_core.models.vitmae import vitmae_key_map

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one thread is faster, and immune to a busy machine's thread contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def a424(tmp_path_factory):
    root = tmp_path_factory.mktemp("a424")
    xyz = fl.write_a424_coordinates(root / "A424_Coordinates.dat")
    return root / "A424_Coordinates.dat", xyz


@pytest.fixture(scope="module", params=[16, 14], ids=["111m-layout", "650m-layout"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"vitmae{request.param}")
    fl.write_vitmae_checkpoint(folder, patch=request.param)
    return folder, request.param


@pytest.fixture(scope="module")
def scans():
    rng = np.random.default_rng(0)
    # TR 2.0 (resampled to 435 samples: 2 windows), TR 0.8 (within 0.1 s of 0.735: kept,
    # 2 windows), a short TR 2.0 scan (136 samples: padded to one window)
    return [(rng.standard_normal((160, 424)) * 3 + 10, 2.0),
            (rng.standard_normal((450, 424)) + 2, 0.8),
            (rng.standard_normal((50, 424)) * 2 - 1, 2.0)]


def _encoder(folder, coords, scans, **kw):
    enc = load_encoder(folder, "cpu", coordinates=coords, **kw)
    enc.fit_scaling([s for s, _ in scans])
    return enc


def test_embedding_equals_the_reference(checkpoint, a424, scans):
    folder, patch = checkpoint
    coords, xyz = a424
    enc = _encoder(folder, coords, scans)
    assert enc.entry.name == ("vitmae-111m" if patch == 16 else "vitmae-650m")
    side = 432 if patch == 16 else 434
    assert enc.entry.image_size == (side, side) and enc.entry.pad_value == -1.0
    med, iqr = fl.reference_stats([s for s, _ in scans])
    np.testing.assert_allclose(enc.scaling.median, med.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(enc.scaling.iqr, iqr.numpy(), rtol=0, atol=1e-12)
    for k, (s, tr) in enumerate(scans):
        ref_windows = fl.reference_windows(s, tr, med, iqr, max_val=fl.MAX_VAL,
                                           order=fl.y_order(xyz), channels=3)
        ours = enc.windows(s, tr)
        assert ours.shape == ref_windows.shape == (2 if k < 2 else 1, 3, 424, 200)
        torch.testing.assert_close(ours, ref_windows, rtol=0, atol=1e-6)
        ref = fl.reference_vitmae_cls(folder, ref_windows, shuffle_seed=k).mean(0)
        got = torch.from_numpy(enc.embed_scan(s, tr))
        torch.testing.assert_close(got, ref, **TOL)


def test_cls_does_not_depend_on_the_token_shuffle(checkpoint, a424, scans):
    """Exact attention, positions added before the shuffle: the reference's random order only
    adds float rounding. Measured here (max |difference| over 3 random orders)."""
    folder, _ = checkpoint
    enc = _encoder(folder, a424[0], scans)
    x = enc.windows(*scans[0])
    with torch.no_grad():
        natural = enc.embed_windows(x)
    diffs = [(fl.reference_vitmae_cls(folder, x, shuffle_seed=s) - natural).abs().max().item()
             for s in range(3)]
    scale = natural.abs().max().item()
    assert max(diffs) < 1e-5 * max(1.0, scale), diffs
    # ... while two different scans differ by orders of magnitude more
    other = enc.embed_windows(enc.windows(*scans[1]))
    assert (other - natural).abs().max().item() > 1e3 * max(diffs)


def test_last_block_readout_is_brainmarks_hidden_state(checkpoint, a424, scans):
    folder, _ = checkpoint
    enc = _encoder(folder, a424[0], scans, readout="last-block")
    x = enc.windows(*scans[1])
    with torch.no_grad():
        got = enc.embed_windows(x)
    torch.testing.assert_close(got, fl.reference_vitmae_cls(folder, x, last_block=True), **TOL)


def test_embed_windows_is_differentiable_and_frozen(checkpoint, a424, scans):
    folder, _ = checkpoint
    enc = _encoder(folder, a424[0], scans)
    x = enc.windows(*scans[2]).requires_grad_(True)
    w = torch.randn(enc.entry.hidden_size, generator=torch.Generator().manual_seed(0))
    (enc.embed_windows(x) @ w).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in enc.parameters())
    # attributions map back to the atlas's region order (channels summed)
    back = enc.to_atlas_order(x.grad)
    assert back.shape == (1, 424, 200)
    row_of = {int(r): i for i, r in enumerate(enc.region_index)}
    torch.testing.assert_close(back[0, 7], x.grad[0, :, row_of[7]].sum(0))


def test_key_map_accepts_both_transformers_spellings():
    v4 = ["vit.encoder.layer.3.attention.attention.query.weight",
          "vit.encoder.layer.3.attention.output.dense.bias",
          "vit.encoder.layer.3.intermediate.dense.weight",
          "vit.encoder.layer.3.output.dense.weight", "vit.embeddings.cls_token",
          "vit.layernorm.bias", "decoder.decoder_pred.weight"]
    assert vitmae_key_map(v4) == {
        v4[0]: "layers.3.attention.q_proj.weight", v4[1]: "layers.3.attention.o_proj.bias",
        v4[2]: "layers.3.mlp.fc1.weight", v4[3]: "layers.3.mlp.fc2.weight",
        v4[4]: "embeddings.cls_token", v4[5]: "layernorm.bias", v4[6]: None}
    v5 = ["vit.layers.0.attention.k_proj.weight", "layers.1.mlp.fc2.bias"]
    assert vitmae_key_map(v5) == {v5[0]: "layers.0.attention.k_proj.weight",
                                  v5[1]: "layers.1.mlp.fc2.bias"}


def test_scans_need_the_cohort_statistics_and_the_a424_regions(checkpoint, a424, scans):
    folder, _ = checkpoint
    enc = load_encoder(folder, "cpu", coordinates=a424[0])
    with pytest.raises(InvalidInputError, match="robust_scaling.json does not exist yet"):
        enc.windows(*scans[0])
    enc.fit_scaling([s for s, _ in scans])
    with pytest.raises(InvalidInputError, match="expects 424 A424 regions .* got 426 columns"):
        enc.windows(np.zeros((300, 426)), 2.0)
    path = enc.scaling.save(folder)
    try:
        again = load_encoder(folder, "cpu", coordinates=a424[0])
        assert again.scaling is not None and again.preprocessing_hash == enc.preprocessing_hash
    finally:
        path.unlink()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runs_in_bf16(checkpoint, a424, scans):  # pragma: no cover - no GPU in CI
    folder, _ = checkpoint
    enc = _encoder(folder, a424[0], scans)
    gpu = load_encoder(folder, "cuda", coordinates=a424[0], scaling=enc.scaling)
    assert gpu.precision == "bf16" and gpu.preprocessing_hash != enc.preprocessing_hash
    a, b = enc.embed_scan(*scans[0]), gpu.embed_scan(*scans[0])
    assert np.corrcoef(a, b)[0, 1] > 0.99
