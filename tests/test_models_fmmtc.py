"""The fused FMM-TC model: shapes, the freeze, ablation switches, the paper preset."""

from __future__ import annotations

import pytest
import torch

from fmmtc_core import InvalidInputError
from fmmtc_core.models.fmmtc import FMMTC, PRESETS, FMMTCConfig
from fmmtc_core.models.foundation import BrainLMConfig, BrainLMModel

R, T = 10, 40


def _fcfg():
    return BrainLMConfig.tiny(num_brain_voxels=R, num_timepoints_per_voxel=T,
                              timepoint_patching_size=10, num_landmarks=8).to_dict()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, R, T, generator=g)
    fc = torch.tanh(torch.randn(4, R, R, generator=g))
    fc = (fc + fc.transpose(1, 2)) / 2
    return w, fc, torch.randn(R, 3, generator=g) * 40


def _model(**kw):
    cfg = FMMTCConfig(n_regions=R, foundation_config=_fcfg(), **kw)
    foundation = None
    if cfg.use_ts and cfg.foundation == "pretrained":
        foundation = BrainLMModel(BrainLMConfig(**cfg.foundation_config))
    return FMMTC(cfg, foundation)


def test_forward_shapes_for_every_ablation(inputs):
    for modalities in ("ts+fc", "ts", "fc"):
        for foundation in ("pretrained", "scratch"):
            model = _model(modalities=modalities, foundation=foundation)
            assert model(*inputs).shape == (4,)


def test_frozen_foundation_gets_no_gradient_but_inputs_do(inputs):
    model = _model().train()
    assert model.frozen_ts and not model.ts_encoder.training  # stays in eval mode
    window = inputs[0].clone().requires_grad_(True)
    model(window, inputs[1], inputs[2]).sum().backward()
    assert all(p.grad is None for p in model.ts_encoder.parameters())
    assert all(not p.requires_grad for p in model.ts_encoder.parameters())
    assert any(p.grad is not None for p in model.fc_encoder.parameters())
    assert window.grad is not None and window.grad.abs().sum() > 0  # IG can flow through
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not trainable & {id(p) for p in model.ts_encoder.parameters()}


def test_scratch_encoder_is_trained(inputs):
    model = _model(foundation="scratch").train()
    model(*inputs).sum().backward()
    assert any(p.grad is not None for p in model.ts_encoder.parameters())


def test_cached_embedding_path_equals_full_forward(inputs):
    model = _model().eval()
    w, fc, xyz = inputs
    emb = model.embed_ts(w, xyz)
    torch.testing.assert_close(model.forward_features(emb, fc), model(w, fc, xyz))


def test_paper_preset_uses_gram_and_resnet(inputs):
    model = _model(**PRESETS["paper"]).eval()
    assert model.config.fc_encoder == "resnet18"
    w, _, xyz = inputs
    assert model(w, None, xyz).shape == (4,)  # the Gram matrix comes from the window


def test_config_validation():
    with pytest.raises(InvalidInputError, match="Invalid value for the 'modalities' parameter"):
        FMMTCConfig(n_regions=R, modalities="both")
    cfg = FMMTCConfig(n_regions=R, foundation="scratch", foundation_config=_fcfg())
    with pytest.raises(InvalidInputError, match="takes no pretrained encoder"):
        FMMTC(cfg, BrainLMModel(BrainLMConfig(**cfg.foundation_config)))
    with pytest.raises(InvalidInputError, match="needs the connectivity matrix"):
        model = _model()
        model(torch.randn(1, R, T), None, torch.randn(R, 3))
    with pytest.raises(InvalidInputError, match="dynamics=True extends the regional "
                                                "amplitude input: it needs amplitude=True"):
        FMMTCConfig(n_regions=R, dynamics=True)
    with pytest.raises(InvalidInputError, match="'dynamics' must be true or false"):
        FMMTCConfig.from_dict({"n_regions": R, "amplitude": True, "dynamics": "yes"})
    cfg = FMMTCConfig(n_regions=R, modalities="ts", amplitude=True, dynamics=True,
                      ts_embedding=False)
    assert (cfg.amplitude_size, cfg.amplitude_kind) == (4 * R, "dynamics")
    assert FMMTCConfig.from_dict(cfg.to_dict()) == cfg
    # the connectivity-only ablation has no T modality: the dynamics switch is moot
    assert FMMTCConfig(n_regions=R, modalities="fc", amplitude=True,
                       dynamics=True).amplitude_kind == "relative"


def test_ts_pooling_mean_uses_the_token_mean(inputs):
    w, fc, xyz = inputs
    model = _model(ts_pooling="mean").eval()
    with torch.no_grad():
        tokens, _, _ = model.ts_encoder(w, xyz, mask_ratio=0.0)
        torch.testing.assert_close(model.embed_ts(w, xyz), tokens[:, 1:].mean(1))
    with pytest.raises(InvalidInputError, match="'ts_pooling' parameter"):
        FMMTCConfig(n_regions=R, ts_pooling="max")
