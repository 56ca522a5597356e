"""Great Expectations validation of releases: what must never be released is rejected."""

from __future__ import annotations

import hmac

import pandas as pd
import pytest

from retention.generalise import PERSON, build_release, person_codes
from retention.release_validation import PATTERNS, validate
from tests.test_generalise import records, spec


@pytest.fixture(scope="module")
def built():
    frame = pd.DataFrame(records(30) + records(10, start=100, sector="Conseil"))
    return frame, build_release(frame, spec())


def test_a_clean_release_passes_every_check(built):
    frame, release = built
    result = validate(release.data, release.profile, spec(), person_codes(frame[PERSON]))
    assert result.success, result.failures()
    names = {r["check"] for r in result.results}
    assert {"output schema: declared columns only", "no e-mail", "no phone", "no IBAN", "no IPv4", "no IPv6",
            "no per-person token", "no person's key", "every group holds at least k=5 people",
            "every group shows at least l=2 values of had_claim"} <= names
    # Every pattern is reported for every column, though checked at once while none matches.
    assert {(f"no {label}", c) for label in PATTERNS for c in release.data.columns} <= {
        (r["check"], r["column"]) for r in result.results}


def test_a_keyed_hash_of_the_customer_id_is_rejected_as_pseudonymised(built):
    frame, release = built
    data = release.data.copy()
    data["sector"] = [hmac.new(b"k" * 32, f"C{i:07d}".encode(), "sha256").hexdigest() for i in range(len(data))]
    result = validate(data, release.profile, spec(), person_codes(frame[PERSON]))
    assert not result.success
    assert any(f.startswith("no per-person token on sector") for f in result.failures())
    # And as an extra column, it is outside the declared schema as well.
    extra = release.data.assign(customer_hash=data["sector"])
    assert "output schema: declared columns only (1 unexpected)" in validate(
        extra, release.profile, spec(), person_codes(frame[PERSON])).failures()


@pytest.mark.parametrize("planted, check", [
    ("jean.dupont@example.fr", "no e-mail"), ("+33 6 12 34 56 78", "no phone"), ("06 12 34 56 78", "no phone"),
    ("FR76 3000 6000 0112 3456 7890 189", "no IBAN"), ("192.168.10.24", "no IPv4"),
    ("2001:db8:85a3::8a2e:370:7334", "no IPv6"), ("C0000003", "no person's key"),
])
def test_personal_values_anywhere_are_rejected(built, planted, check):
    frame, release = built
    data = release.data.copy()
    data.loc[0, "place"] = planted
    result = validate(data, release.profile, spec(), person_codes(frame[PERSON]))
    assert f"{check} on place (1 unexpected)" in result.failures()
    # The check that matched is named, alone: the other patterns of the column still pass.
    assert {r["check"] for r in result.results if r["column"] == "place" and not r["success"]} == {check}
    assert {r["check"] for r in result.results if r["column"] == "place"} >= {f"no {label}" for label in PATTERNS}


def test_small_or_homogeneous_groups_are_rejected(built):
    frame, release = built
    profile = release.profile.copy()
    profile.loc[0, "persons"] = 4
    profile.loc[1, "had_claim_distinct"] = 1
    failures = validate(release.data, profile, spec(), person_codes(frame[PERSON])).failures()
    assert "every group holds at least k=5 people (1 unexpected)" in failures
    assert "every group shows at least l=2 values of had_claim (1 unexpected)" in failures


def test_a_row_id_in_microdata_is_rejected():
    frame = pd.DataFrame(records(12))
    microdata = spec(release="microdata", measures=())
    release = build_release(frame, microdata)
    data = release.data.copy()
    data["sector"] = [f"row {i}" for i in range(len(data))]  # unique per row: a stable row id
    failures = validate(data, release.profile, microdata, person_codes(frame[PERSON])).failures()
    assert any(f.startswith("no column telling rows apart (row id) on sector") for f in failures)
