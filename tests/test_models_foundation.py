"""BrainLM-compatible foundation encoder: checkpoint layout, loading errors, behaviour."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fmmtc_core import InvalidInputError
from fmmtc_core.models.foundation import (
    PUBLIC_UNUSED_KEYS,
    BrainLMConfig,
    BrainLMForPretraining,
    load_foundation,
)

R, T = 12, 40


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one thread is faster, and immune to a busy machine's thread contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def config():
    return BrainLMConfig.tiny(num_brain_voxels=R, num_timepoints_per_voxel=T,
                              timepoint_patching_size=10, num_landmarks=8)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, R, T, generator=g), torch.randn(R, 3, generator=g) * 40


def _public_checkpoint(tmp_path, config, *, drop=None, extra=None, reshape=None):
    """A random checkpoint in the public BrainLM layout: config.json + model.safetensors."""
    torch.manual_seed(1)
    model = BrainLMForPretraining(config)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    # The public checkpoints also carry ViT-MAE's unused image head.
    state[PUBLIC_UNUSED_KEYS[0]] = torch.randn(768, config.decoder_hidden_size)
    state[PUBLIC_UNUSED_KEYS[1]] = torch.randn(768)
    if drop:
        state.pop(drop)
    if extra:
        state[extra] = torch.zeros(2)
    if reshape:
        state[reshape] = torch.zeros(3, 3)
    folder = tmp_path / "brainlm"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    cfg = config.to_dict()
    # Fields the public config carries for its ViT superclass, unused here.
    cfg |= {"image_size": 224, "patch_size": 16, "num_channels": 3, "qkv_bias": True,
            "norm_pix_loss": False, "architectures": ["BrainLMForPretraining"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, model


def test_public_layout_loads_every_tensor(tmp_path, config, batch):
    folder, original = _public_checkpoint(tmp_path, config)
    loaded = load_foundation(folder)
    assert isinstance(loaded, BrainLMForPretraining) and not loaded.training
    for k, v in original.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    names = set(loaded.state_dict())
    assert "vit.embeddings.signal_embedding_projection.weight" in names
    assert "vit.embeddings.xyz_embedding_projection.weight" in names
    assert "vit.encoder.layer.1.attention.self.conv.weight" in names
    assert "decoder.decoder_xyz_projection.weight" in names
    original.eval()
    torch.testing.assert_close(loaded.embed(*batch), original.embed(*batch))


def test_save_pretrained_round_trip_and_encoder_only(tmp_path, config, batch):
    model = BrainLMForPretraining(config).eval()
    model.save_pretrained(tmp_path / "m")
    again = load_foundation(tmp_path / "m")
    torch.testing.assert_close(again.embed(*batch), model.embed(*batch))
    enc = load_foundation(tmp_path / "m", encoder_only=True)
    torch.testing.assert_close(enc.embed(*batch), model.embed(*batch))
    # An encoder saved on its own (names without "vit.") loads through the key map.
    model.vit.save_pretrained(tmp_path / "enc")
    enc2 = load_foundation(tmp_path / "enc")
    torch.testing.assert_close(enc2.embed(*batch), model.embed(*batch))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"drop": "vit.layernorm.weight"}, "is missing 1 parameters: vit.layernorm.weight"),
        ({"extra": "vit.pooler.dense.weight"}, "1 unexpected parameters: vit.pooler.dense.weight"),
        ({"reshape": "vit.embeddings.xyz_embedding_projection.weight"},
         r"wrong shape: vit.embeddings.xyz_embedding_projection.weight \(3, 3\)"),
    ],
)
def test_mismatched_checkpoints_name_the_keys(tmp_path, config, kwargs, match):
    folder, _ = _public_checkpoint(tmp_path, config, **kwargs)
    with pytest.raises(InvalidInputError, match=match):
        load_foundation(folder)


def test_missing_files_pickles_and_model_type(tmp_path, config):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_foundation(tmp_path / "none")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="missing model.safetensors"):
        load_foundation(tmp_path / "a")
    (tmp_path / "a" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InvalidInputError, match="pickled PyTorch weights .* not loaded"):
        load_foundation(tmp_path / "a")
    folder, _ = _public_checkpoint(tmp_path, config)
    cfg = json.loads((folder / "config.json").read_text()) | {"model_type": "vit_mae"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidInputError, match="model_type 'vit_mae'; expected 'brainlm_mae'"):
        load_foundation(folder)


def test_input_checks(config, batch):
    model = BrainLMForPretraining(config)
    signal, xyz = batch
    with pytest.raises(InvalidInputError, match="12 regions but centroids of shape \\(3, 11, 3\\)"):
        model.embed(signal, xyz[:11])
    with pytest.raises(InvalidInputError, match="not a multiple of the patch size 10"):
        model.embed(signal[:, :, :35], xyz)
    with pytest.raises(InvalidInputError, match="Invalid value for the 'pooling' parameter"):
        model.embed(signal, xyz, pooling="max")


def test_masking_ratio_and_deterministic_noise(config, batch):
    model = BrainLMForPretraining(config).eval()
    signal, xyz = batch
    noise = torch.rand(3, R * (T // 10), generator=torch.Generator().manual_seed(3))
    a = model(signal, xyz, noise=noise)
    b = model(signal, xyz, noise=noise)
    assert a.mask.shape == (3, R, T // 10)
    assert a.mask.mean().item() == pytest.approx(0.75, abs=0.02)
    torch.testing.assert_close(a.loss, b.loss)
    assert a.reconstruction.shape == (3, R, T // 10, 10)


def test_pretraining_loss_decreases(config, batch):
    torch.manual_seed(0)
    model = BrainLMForPretraining(config)
    signal, xyz = batch
    smooth = torch.cumsum(signal, dim=-1) / 5  # structured signals are learnable
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        out = model(smooth, xyz)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_embed_is_differentiable_wrt_the_signal(config, batch):
    model = BrainLMForPretraining(config).eval()
    signal = batch[0].clone().requires_grad_(True)
    emb = model.embed(signal, batch[1])
    assert emb.shape == (3, config.hidden_size)
    # (A plain sum would be constant: layer-normed features sum to the bias.)
    w = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(2))
    (emb @ w).sum().backward()
    assert signal.grad is not None and signal.grad.abs().sum() > 1e-3


def test_nystrom_is_exact_for_short_sequences_and_scales_to_4000_tokens(config, batch):
    torch.manual_seed(0)
    nys = BrainLMForPretraining(config).eval()
    exact = BrainLMForPretraining(BrainLMConfig(**(config.to_dict() | {
        "attention_mode": "exact"}))).eval()
    exact.load_state_dict(nys.state_dict())
    # 1 region x 4 patches + CLS = 5 tokens, fewer than the 8 landmarks: attention is exact.
    short = batch[0][:, :1, :]
    torch.testing.assert_close(nys.embed(short, batch[1][:1]), exact.embed(short, batch[1][:1]))
    # On 49 tokens the two differ (Nystrom approximates), but stay well correlated.
    a, b = nys.embed(*batch).flatten(), exact.embed(*batch).flatten()
    assert not torch.allclose(a, b) and torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.5
    big = BrainLMForPretraining(BrainLMConfig.tiny()).eval()  # 64 landmarks
    with torch.no_grad():
        out = big.embed(torch.randn(1, 424, 200), torch.randn(424, 3))  # 4,240 tokens
    assert out.shape == (1, 64) and torch.isfinite(out).all()


def test_presets_match_the_paper_geometry():
    small = BrainLMConfig.small()
    assert (small.hidden_size, small.num_hidden_layers, small.num_attention_heads,
            small.intermediate_size) == (256, 4, 4, 1024)
    assert (small.num_brain_voxels, small.num_timepoints_per_voxel,
            small.timepoint_patching_size) == (424, 200, 20)
    assert small.mask_ratio == 0.75 and small.model_type == "brainlm_mae"
    base = BrainLMConfig.base()
    n = sum(p.numel() for p in BrainLMForPretraining(base).parameters())
    assert 100e6 < n < 120e6  # BrainLM-111M


def test_xyz_scale_multiplies_the_centroids_and_round_trips(tmp_path, config, batch):
    window, xyz = batch
    assert config.xyz_scale == 1.0  # the default: checkpoints without the field load unchanged
    torch.manual_seed(0)
    plain = BrainLMForPretraining(config).eval()
    scaled_cfg = BrainLMConfig.tiny(num_brain_voxels=R, num_timepoints_per_voxel=T,
                                    timepoint_patching_size=10, num_landmarks=8, xyz_scale=0.01)
    scaled = BrainLMForPretraining(scaled_cfg).eval()
    scaled.load_state_dict(plain.state_dict())
    # encoder and decoder both see xyz * 0.01
    torch.testing.assert_close(scaled.embed(window, xyz), plain.embed(window, xyz * 0.01))
    noise = torch.rand(3, R * config.n_patches, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(scaled(window, xyz, noise=noise).loss,
                               plain(window, xyz * 0.01, noise=noise).loss)
    scaled.save_pretrained(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "config.json").read_text())["xyz_scale"] == 0.01
    assert load_foundation(tmp_path / "s").config.xyz_scale == 0.01
    for bad in (0, -1.0, "mm"):
        with pytest.raises(InvalidInputError, match="xyz_scale must be a positive number"):
            BrainLMConfig.tiny(xyz_scale=bad)


# --------------------------------------------------------------------------------------------
# The published legacy layout against a reference forward written from the published algorithm
# (tests/foundation_layouts.py imports nothing from the project)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    import foundation_layouts as fl

    root = tmp_path_factory.mktemp("legacy")
    xyz = fl.write_a424_coordinates(root / "A424_Coordinates.dat")
    fl.write_legacy_checkpoint(root / "ckpt")
    return root, torch.tensor(xyz, dtype=torch.float32)


def test_public_config_without_attention_mode_loads_as_the_reference_computes(legacy):
    root, _ = legacy
    raw = json.loads((root / "ckpt" / "config.json").read_text())
    assert "attention_mode" not in raw and raw["num_landmarks"] == raw["segment_means_seq_len"]
    assert load_foundation(root / "ckpt").config.attention_mode == "exact"
    assert BrainLMConfig(num_landmarks=32).attention_mode == "nystrom"  # reference can't run it
    assert BrainLMConfig(attention_mode="nystrom").attention_mode == "nystrom"  # explicit: kept
    with pytest.raises(InvalidInputError, match="'attention_mode' parameter"):
        BrainLMConfig(attention_mode="fast")


def test_legacy_cls_equals_the_reference_forward(legacy):
    import foundation_layouts as fl
    from fmmtc_core.models.registry import load_encoder

    root, xyz = legacy
    enc = load_encoder(root / "ckpt", "cpu", coordinates=root / "A424_Coordinates.dat",
                       order_samples=1, order_seed=5)
    assert enc.entry.name == "legacy-13m" and enc.entry.window == 40
    x = torch.randn(3, 424, 40, generator=torch.Generator().manual_seed(0))
    n = 424 * 2
    noise = torch.rand(1, n, generator=torch.Generator().manual_seed(5)).expand(3, n)
    ref = fl.reference_legacy_tokens(root / "ckpt", x, xyz.expand(3, -1, -1), noise)
    with torch.no_grad():
        got = enc.embed_windows(x)
    torch.testing.assert_close(got, ref[:, 0], rtol=1e-5, atol=1e-5)
    # the patch tokens too (the project's model, same noise, mean pooling)
    mean_enc = load_encoder(root / "ckpt", "cpu", coordinates=root / "A424_Coordinates.dat",
                            order_samples=1, order_seed=5, token_pooling="mean")
    with torch.no_grad():
        torch.testing.assert_close(mean_enc.embed_windows(x), ref[:, 1:].mean(1), rtol=1e-5,
                                   atol=1e-5)


def test_legacy_scan_embedding_equals_the_reference_pipeline(legacy):
    """Global robust scaling (no max-value division), resampling to 0.735 s, non-overlapping
    windows in A424 label order, coordinates in mm, mean over K seeded shuffles and windows."""
    import numpy as np

    import foundation_layouts as fl
    from fmmtc_core.models.registry import load_encoder

    root, xyz = legacy
    rng = np.random.default_rng(1)
    scans = [rng.standard_normal((60, 424)) * 4 + 3, rng.standard_normal((30, 424))]
    enc = load_encoder(root / "ckpt", "cpu", coordinates=root / "A424_Coordinates.dat",
                       order_samples=3)
    enc.fit_scaling(scans)
    med, iqr = fl.reference_stats(scans)
    w = fl.reference_windows(scans[0], 1.2, med, iqr, max_val=1.0, order=None, channels=0,
                             window=40)
    assert w.shape == (2, 424, 40)  # 60 samples at 1.2 s -> 98 samples -> 2 windows
    torch.testing.assert_close(enc.windows(scans[0], 1.2), w, rtol=0, atol=1e-6)
    n = 424 * 2
    draws = [fl.reference_legacy_tokens(
        root / "ckpt", w, xyz.expand(len(w), -1, -1),
        torch.rand(1, n, generator=torch.Generator().manual_seed(k)).expand(len(w), n))[:, 0]
        for k in range(3)]
    ref = torch.stack(draws).mean(0).mean(0)
    torch.testing.assert_close(torch.from_numpy(enc.embed_scan(scans[0], 1.2)), ref,
                               rtol=1e-5, atol=1e-5)


def test_token_order_effect_comes_from_the_sequence_convolution(legacy):
    """Measured: the legacy CLS depends on the token order only through the Nystromformer's
    depthwise convolution over the sequence; without it (exact attention, positions added
    before the shuffle) it is invariant up to float rounding."""
    root, xyz = legacy
    model = load_foundation(root / "ckpt", encoder_only=True)
    x = torch.randn(1, 424, 40, generator=torch.Generator().manual_seed(2))
    n = 424 * 2

    def cls(m, seed):
        noise = None if seed is None else torch.rand(1, n, generator=torch.Generator()
                                                     .manual_seed(seed))
        with torch.no_grad():
            return m(x, xyz, mask_ratio=0.0, noise=noise)[0][0, 0]

    with_conv = [cls(model, s) for s in (None, 1, 2)]
    assert (with_conv[0] - with_conv[1]).abs().max() > 1e-3
    for layer in model.encoder.layer:
        layer.attention.self.conv_kernel_size = None  # drop the convolution term
    without = [cls(model, s) for s in (None, 1, 2)]
    for other in without[1:]:
        torch.testing.assert_close(other, without[0], rtol=1e-5, atol=1e-5)


def test_exact_attention_without_convolution_is_order_invariant(batch):
    """``conv_kernel_size=None`` builds (transformers' strict config refuses None; the layer
    drops the convolution itself) and, with exact attention, the CLS does not depend on the
    token order: every token carries its region's centroid and its patch's time."""
    signal, xyz = batch
    cfg = BrainLMConfig.tiny(num_brain_voxels=R, num_timepoints_per_voxel=T,
                             timepoint_patching_size=10, attention_mode="exact",
                             conv_kernel_size=None)
    torch.manual_seed(0)
    model = BrainLMForPretraining(cfg).eval()
    assert not any(".conv." in name for name, _ in model.named_parameters())
    n = R * cfg.n_patches

    def cls(seed):
        noise = None if seed is None else torch.rand(
            1, n, generator=torch.Generator().manual_seed(seed)).expand(len(signal), n)
        with torch.no_grad():
            return model.vit(signal, xyz.expand(len(signal), -1, -1), mask_ratio=0.0,
                             noise=noise)[0][:, 0]

    natural = cls(None)
    for seed in (1, 2):
        torch.testing.assert_close(cls(seed), natural, rtol=1e-5, atol=1e-5)
    assert (natural[0] - natural[1]).abs().max() > 1e-3  # it still sees the subject


def test_natural_token_order_keeps_kept_tokens_in_order(config, batch):
    signal, xyz = batch
    natural_cfg = BrainLMConfig(**(config.to_dict() | {"token_order": "natural"}))
    torch.manual_seed(0)
    shuffled = BrainLMForPretraining(config).eval()
    natural = BrainLMForPretraining(natural_cfg).eval()
    natural.load_state_dict(shuffled.state_dict())
    noise = torch.rand(3, R * config.n_patches, generator=torch.Generator().manual_seed(4))
    emb = natural.vit.embeddings
    xyz3 = xyz.expand(3, -1, -1)
    _, mask_n, restore_n = emb(signal, xyz3, 0.75, noise)
    _, mask_s, _ = shuffled.vit.embeddings(signal, xyz3, 0.75, noise)
    torch.testing.assert_close(mask_n, mask_s)  # the same tokens are masked
    kept = torch.argsort(restore_n, dim=1)[:, : int(R * config.n_patches * 0.25)]
    assert torch.equal(kept, kept.sort(dim=1).values)  # ... and the kept ones stay in order
    # the decoder puts every token back where it was: the loss is computed on the same patches
    a, b = natural(signal, xyz, noise=noise), shuffled(signal, xyz, noise=noise)
    torch.testing.assert_close(a.mask, b.mask)
    assert natural.config.to_dict()["token_order"] == "natural"


def test_the_per_sample_pseudo_inverse_start_is_refused_by_name():
    # transformers' Nystromformer (and the reference copied from it) raise a TypeError on it
    with pytest.raises(InvalidInputError, match="inv_coeff_init_option=true cannot be built"):
        BrainLMConfig(inv_coeff_init_option=True)
