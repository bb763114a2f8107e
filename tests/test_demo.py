"""The bundled demo model is rebuilt by the command its card records: bit for bit on the kind
of CPU it was built on, to a tolerance on another (torch promises no more)."""

from __future__ import annotations

import hashlib
import json
import shlex

import pytest

from fmmtc_core.cli import build_parser
from fmmtc_core.config import DEMO_MODEL_DIR

#: On another kind of CPU than the build's: the pretrained encoder's weights (measured across
#: two machines: 5e-6) and the out-of-fold AUC may differ by at most this much.
ENCODER_ATOL = 1e-4
AUC_TOL = 0.03


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_demo_rebuild_matches_the_committed_model(tmp_path):
    """Run the card's ``build_command`` (the same code path as ``fmmtc build-demo``) into a
    temporary folder. On the CPU kind the card records (``build_platform``): every weights
    file, the encoder and its config hash to the digests the committed card records, and the
    out-of-fold metrics and predictions are the same. On another kind: the encoder's weights
    agree to ``ENCODER_ATOL`` and the out-of-fold AUC to ``AUC_TOL``."""
    from safetensors.torch import load_file

    from fmmtc_core.demo import build_demo_model, build_platform

    card = json.loads((DEMO_MODEL_DIR / "model_card.json").read_text())
    argv = shlex.split(card["build_command"])
    assert argv[:2] == ["fmmtc", "build-demo"]
    args = build_parser().parse_args(argv[1:] + ["--out", str(tmp_path / "demo")])
    metrics = build_demo_model(args.out, seed=args.seed, n_subjects=args.subjects,
                               n_corpus=args.corpus, pretrain_epochs=args.pretrain_epochs,
                               simulation=args.simulation, preset=args.preset,
                               threads=args.threads)
    rebuilt = tmp_path / "demo"
    committed = json.loads((DEMO_MODEL_DIR / "metrics.json").read_text())
    assert card["files"], "the committed card records no file digests"
    assert json.loads((rebuilt / "model_card.json").read_text())["build_platform"] == \
        build_platform()
    if card.get("build_platform") == build_platform():
        for name, digest in card["files"].items():
            assert _sha256(rebuilt / name) == digest, f"{name} differs from the committed demo"
        assert metrics["auc"] == committed["auc"] and metrics["mcc"] == committed["mcc"]
        assert (rebuilt / "oof_predictions.tsv").read_bytes() == (
            DEMO_MODEL_DIR / "oof_predictions.tsv").read_bytes()
    else:  # another kind of CPU: the same computation, other rounding
        name = "foundation/model.safetensors"
        ours, theirs = load_file(str(rebuilt / name)), load_file(str(DEMO_MODEL_DIR / name))
        assert ours.keys() == theirs.keys()
        worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
        assert worst <= ENCODER_ATOL, f"the encoder differs by {worst:.2e} on this CPU"
        assert abs(metrics["auc"] - committed["auc"]) <= AUC_TOL
        assert (rebuilt / "foundation" / "config.json").read_bytes() == (
            DEMO_MODEL_DIR / "foundation" / "config.json").read_bytes()
