"""What a model is valid for, read off its card, and the warning every result carries."""

from __future__ import annotations

import json

import pytest

from fmmtc_core.config import DEMO_MODEL_DIR
from fmmtc_core.validity import ModelValidity, model_validity


def _real_card(**extra) -> dict:
    return {"name": "site-model", "data": {"cohort": "/data/pain", "n_subjects": 80,
                                           "n_responders": 30, "sites": ["leeds"],
                                           "simulated": False}, **extra}


def test_the_bundled_demo_says_it_learnt_from_simulated_data_only():
    card = json.loads((DEMO_MODEL_DIR / "model_card.json").read_text())
    v = model_validity(card)
    assert v.status == "simulated" and v.warn and v.severe
    assert "SIMULATED DATA ONLY" in v.headline
    assert "says nothing about a real person" in v.message and "'fmmtc-demo'" in v.message
    assert v.valid_for.startswith("Trying out the software")
    assert v.trained_on.startswith("simulated data: simulated: fmmtc simulate")
    assert v.text.startswith(v.headline + ": ")


def test_a_real_model_without_a_site_validation_warns():
    v = model_validity(_real_card())
    assert v.status == "not validated" and v.warn and not v.severe
    assert v.headline == "NOT VALIDATED ON THIS SITE'S DATA"
    assert "/data/pain (80 participants, 30 responders from site(s) leeds)" in v.message
    assert "cross-validation estimate" in v.message
    assert "site_validation" in v.valid_for


def test_a_recorded_site_validation_lifts_the_warning():
    v = model_validity(_real_card(site_validation={"site": "leeds", "n_subjects": 41,
                                                   "auc": 0.71, "notes": "ignored"}))
    assert v.status == "validated" and not v.warn and v.headline == ""
    assert v.message == ("Model 'site-model' was validated on this site's data "
                         "(site leeds; n subjects 41; auc 0.71).")
    assert v.text == v.message


@pytest.mark.parametrize("card", [None, {}, {"name": "m"}, {"data": "not an object"}, [1]])
def test_a_card_that_does_not_name_its_data_is_treated_as_the_worst_case(card):
    v = model_validity(card, "m")
    assert v.status == "unknown" and v.warn and v.severe
    assert "does not say what data it was trained on" in v.message


def test_to_dict_is_json_ready_and_says_whether_to_warn():
    d = model_validity(_real_card()).to_dict()
    json.dumps(d)
    assert d["warning"] is True and d["status"] == "not validated"
    assert set(d) == {"status", "headline", "message", "valid_for", "trained_on", "warning"}
    assert isinstance(model_validity(None), ModelValidity)
