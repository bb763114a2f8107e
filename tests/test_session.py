"""The dashboard's shared page helpers (fmmtc_app.session) that need no running app."""

from __future__ import annotations

import pytest

from fmmtc_app import session
from fmmtc_core._errors import InvalidInputError


@pytest.fixture
def shown(monkeypatch):
    errors: list[str] = []
    monkeypatch.setattr(session.st, "error", errors.append)
    return errors


def test_plain_error_does_not_repeat_the_subject(shown):
    # "This scan cannot be used: This scan was already screened ..." read twice.
    session.plain_error(InvalidInputError("This scan was already screened for participant "
                                          "'PAIN-1'; a scan belongs to one participant."))
    assert shown == ["This scan was already screened for participant 'PAIN-1'; a scan belongs "
                     "to one participant."]


def test_plain_error_prefixes_other_messages(shown):
    session.plain_error(InvalidInputError("x.nii.gz has 12 volumes; at least 50 are needed."))
    session.plain_error(InvalidInputError("bad"), "The upload could not be read")
    assert shown == ["This scan cannot be used: x.nii.gz has 12 volumes; at least 50 are "
                     "needed.", "The upload could not be read: bad"]


def test_plain_error_hides_internal_errors(shown):
    session.plain_error(KeyError("secret detail"))
    assert len(shown) == 1 and "secret detail" not in shown[0]
    assert shown[0].startswith("Something went wrong on our side (KeyError). Nothing was saved.")
