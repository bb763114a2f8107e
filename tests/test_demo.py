"""The bundled demo model is rebuilt bit for bit by the command its card records."""

from __future__ import annotations

import hashlib
import json
import shlex

import pytest

from fmmtc_core.cli import build_parser
from fmmtc_core.config import DEMO_MODEL_DIR


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_demo_rebuild_is_bit_identical_to_the_committed_model(tmp_path):
    """Run the card's ``build_command`` (the same code path as ``fmmtc build-demo``) into a
    temporary folder: every weights file, the encoder and its config hash to the digests the
    committed card records, and the out-of-fold metrics are the same numbers."""
    from fmmtc_core.demo import build_demo_model

    card = json.loads((DEMO_MODEL_DIR / "model_card.json").read_text())
    argv = shlex.split(card["build_command"])
    assert argv[:2] == ["fmmtc", "build-demo"]
    args = build_parser().parse_args(argv[1:] + ["--out", str(tmp_path / "demo")])
    metrics = build_demo_model(args.out, seed=args.seed, n_subjects=args.subjects,
                               n_corpus=args.corpus, pretrain_epochs=args.pretrain_epochs,
                               simulation=args.simulation, preset=args.preset,
                               threads=args.threads)
    rebuilt = tmp_path / "demo"
    assert card["files"], "the committed card records no file digests"
    for name, digest in card["files"].items():
        assert _sha256(rebuilt / name) == digest, f"{name} differs from the committed demo"
    committed = json.loads((DEMO_MODEL_DIR / "metrics.json").read_text())
    assert metrics["auc"] == committed["auc"] and metrics["mcc"] == committed["mcc"]
    assert (rebuilt / "oof_predictions.tsv").read_bytes() == (
        DEMO_MODEL_DIR / "oof_predictions.tsv").read_bytes()
