"""Generalisation and release building: ladders, k, l, suppression, evidence (no database)."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from retention.generalise import PERSON, build_release, departement_of, generalise, person_codes
from retention.rules import Anonymisation, Attribute, QuasiIdentifier, Sensitive


def spec(**overrides) -> Anonymisation:
    base = dict(
        dataset="churn", label="churn", person="customer_number",
        quasi_identifiers=(QuasiIdentifier(Attribute("sector", column="sector"), ("value", "*")),
                           QuasiIdentifier(Attribute("place", column="postcode"), ("departement", "region", "*")),
                           QuasiIdentifier(Attribute("period", event="end"), ("quarter", "year", "*"))),
        sensitive=(Sensitive(Attribute("had_claim", column="c"), ("yes", "no")),),
        measures=(Attribute("revenue", column="amount"),), k=5, l=2, max_suppressed=0.0)
    base.update(overrides)
    return Anonymisation(**base)


def records(n: int, start: int = 0, sector="Industrie", postcode="75011", day=date(2024, 2, 10), claim=None):
    return [{PERSON: f"C{start + i:07d}", "sector": sector, "place": postcode, "period": day,
             "had_claim": claim or ("yes" if i % 2 else "no"), "revenue": 100.0 + i} for i in range(n)]


@pytest.mark.parametrize("value, expected", [("75011", "75"), ("20100", "2A"), ("20290", "2B"), ("97411", "974"),
                                             ("2A", "2A"), ("5", "05"), (None, "unknown")])
def test_departement_of_a_postcode(value, expected):
    assert departement_of(value) == expected


def test_ladder_steps():
    days = pd.Series([date(2024, 2, 10), None])
    assert list(generalise(days, "month")) == ["2024-02", "unknown"]
    assert list(generalise(days, "quarter")) == ["2024-Q1", "unknown"]
    assert list(generalise(days, "year")) == ["2024", "unknown"]
    assert list(generalise(pd.Series(["69003", "13001"]), "region")) == ["Auvergne-Rhône-Alpes",
                                                                       "Provence-Alpes-Côte d'Azur"]
    assert list(generalise(pd.Series([3, 10, 260, None]), ("bands", (0, 10, 250)))) == ["0-9", "10-249", "250+",
                                                                                       "unknown"]
    assert list(generalise(pd.Series([5.0, None]), "value")) == ["5", "unknown"]  # NULLs make floats
    assert list(generalise(pd.Series(["x"]), "*")) == ["*"]


def test_k_minus_one_lookalikes_are_generalised_or_suppressed_never_released():
    # Twenty customers in Paris, and four (k - 1) lookalikes who alone share a sector and a place.
    frame = pd.DataFrame(records(20) + records(4, start=100, sector="Aéronautique", postcode="2A004"))
    release = build_release(frame, spec())
    data = release.data
    assert "Aéronautique" not in set(data["sector"]) and "2A" not in set(data["place"])
    assert (data["persons"] >= 5).all()
    lookalikes = frame[PERSON].str.startswith("C00001")
    # Either suppressed, or merged into a group of at least k people at a coarser step.
    if not release.suppressed[lookalikes].all():
        assert set(data["sector"]) == {"*"} or set(data["place"]) != {"75"}
    assert release.evidence["k_achieved"] >= 5


def test_a_group_without_l_distinct_sensitive_values_is_not_released():
    # Six customers who all had a claim: k holds, but releasing them would tell each one's claim.
    frame = pd.DataFrame(records(10) + records(6, start=50, sector="Santé", claim="yes"))
    release = build_release(frame, spec(quasi_identifiers=spec().quasi_identifiers[:1]))
    assert "Santé" not in set(release.data["sector"]) or (release.data["had_claim__no"] > 0).all()
    assert release.evidence["l_achieved"] >= 2
    assert (release.profile["had_claim_distinct"] >= 2).all()


def test_people_not_records_are_counted():
    # Ten invoices of one customer are one person: never a group of k on their own.
    frame = pd.DataFrame([dict(r, **{PERSON: "C0000001"}) for r in records(10)])
    release = build_release(frame, spec())
    assert release.data.empty and release.evidence["records_suppressed"] == 10


def test_people_are_counted_by_the_hash_of_their_key_text():
    codes = person_codes(pd.Series(["C1", None, "C2", "C1", 1234567.0, "1234567"], dtype=object))
    assert codes.isna().tolist() == [False, True, False, False, False, False]  # no key: nobody
    assert codes[0] == codes[3] and codes[0] != codes[2]
    assert codes[4] == codes[5]  # a whole number read as a float is the key its text shows
    # The frame as attribute_frame gives it: the same release as from the keys themselves.
    frame = pd.DataFrame(records(30) + records(10, start=100, sector="Conseil"))
    hashed = build_release(frame.assign(**{PERSON: person_codes(frame[PERSON])}), spec())
    assert hashed.data.equals(build_release(frame, spec()).data) and hashed.evidence["persons_in"] == 40


def test_records_and_people_worked_on_a_slice_at_a_time_give_the_same_release(monkeypatch):
    from retention import generalise as module

    # 40 people, 8 of them with a second record: distinct people per group, not records; one with no key.
    frame = pd.DataFrame(records(30) + records(10, start=100, sector="Conseil", postcode=None)
                         + records(8) + records(1, start=300, day=None))
    frame.loc[len(frame) - 1, PERSON] = None
    frame = frame.assign(**{PERSON: person_codes(frame[PERSON])})
    for name in ("sector", "place", "had_claim"):
        frame[name] = frame[name].astype("category")
    whole = build_release(frame, spec(max_suppressed=0.1))
    monkeypatch.setattr(module, "SLICE", 3)  # 17 slices of records, 16 of people
    sliced = build_release(frame, spec(max_suppressed=0.1))
    assert sliced.data.equals(whole.data) and sliced.evidence == whole.evidence
    assert sliced.profile.equals(whole.profile) and (sliced.suppressed == whole.suppressed).all()
    assert whole.evidence["persons_in"] == 40 and whole.data["persons"].sum() == 40
    assert whole.data["records"].sum() == 48 and whole.evidence["records_suppressed"] == 1


def test_quasi_identifiers_held_as_category_codes_and_days_give_the_same_release():
    # As the attribute frame holds them: codes into their distinct values, timestamps as their day.
    frame = pd.DataFrame(records(30) + records(12, start=200, postcode="69003", day=date(2023, 7, 1))
                         + records(6, start=300, sector="Conseil", postcode=None, day=None))
    frame["period"] = pd.to_datetime(frame["period"]) + pd.to_timedelta(frame.index % 24, unit="h")
    held = frame.assign(sector=frame["sector"].astype("category"), place=frame["place"].astype("category"),
                        period=frame["period"].dt.normalize().astype("category"))
    raw, coded = build_release(frame, spec(max_suppressed=0.2)), build_release(held, spec(max_suppressed=0.2))
    assert coded.data.equals(raw.data) and coded.evidence == raw.evidence
    assert (coded.suppressed == raw.suppressed).all() and coded.evidence["rows_generalised"] == 42


def test_evidence_adds_up_and_measures_keep_their_totals():
    frame = pd.DataFrame(records(30) + records(12, start=200, postcode="69003", day=date(2023, 7, 1))
                         + records(2, start=300, sector="Conseil", postcode="33000"))
    release = build_release(frame, spec(max_suppressed=0.05))
    ev = release.evidence
    assert ev["records_in"] == ev["records_released"] + ev["records_suppressed"] == 44
    assert int(release.data["records"].sum()) == ev["records_released"]
    revenue = ev["measures"]["revenue"]
    assert revenue["in"] == pytest.approx(frame["revenue"].sum())
    assert float(release.data["revenue"].sum()) == pytest.approx(revenue["released"])
    assert revenue["released"] + revenue["suppressed"] == pytest.approx(revenue["in"])
    assert ev["rows_generalised"] == ev["records_released"]  # dates became quarters at least


def test_microdata_rows_carry_generalised_values_only():
    frame = pd.DataFrame(records(12))
    release = build_release(frame, spec(release="microdata", measures=()))
    assert list(release.data.columns) == ["sector", "place", "period", "had_claim"]
    assert len(release.data) == 12 and set(release.data["period"]) == {"2024-Q1"}
