"""Validate a release with Great Expectations before anything is written or deleted.

Two batches are checked in an ephemeral context: the release itself (its columns are exactly the
declared schema; no value looks like an e-mail, phone number, IBAN, IP address or a per-person
token; no value is a person's key; in a row-level release, no column tells rows apart) and the
profile of its groups (every group holds k people and l distinct values of each sensitive
attribute). Results keep counts only: the unexpected values themselves could be personal data.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pandas as pd

from .generalise import person_codes, release_columns
from .rules import Anonymisation

PATTERNS = {
    "e-mail": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    "phone": r"(?:\+\d{1,3}[\s.-]?\(?\d\)?(?:[\s.-]?\d{2,3}){3,5}|\b0[1-9](?:[\s.-]?\d{2}){4}\b)",
    "IBAN": r"\b[A-Z]{2}\d{2}(?:\s?[A-Z0-9]{4}){2,7}(?:\s?[A-Z0-9]{1,3})?\b",
    "IPv4": r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b",
    "IPv6": r"(?i)\b(?:[0-9a-f]{1,4}:){2,7}(?::|[0-9a-f]{1,4})",
    # A keyed hash or a token: long hex, or a long run of letters and digits with no space.
    "per-person token": r"(?:\b[0-9a-fA-F]{16,}\b|(?=[A-Za-z0-9_+/=-]*\d)(?=[A-Za-z0-9_+/=-]*[A-Za-z])[A-Za-z0-9_+/=-]{20,})",
}
MIN_KEY_LENGTH = 6  # shorter keys (small integers) collide with legitimate counts and codes


@dataclass
class Validation:
    success: bool
    results: list  # [{check, column, success, unexpected}]

    def failures(self) -> list[str]:
        return [f"{r['check']}" + (f" on {r['column']}" if r["column"] else "") + f" ({r['unexpected']} unexpected)"
                for r in self.results if not r["success"]]


def validate(data: pd.DataFrame, profile: pd.DataFrame, spec: Anonymisation,
             persons: pd.Series | None = None) -> Validation:
    """`persons`: the people of the records released from, as `person_codes` gives them."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    import great_expectations.expectations as gxe

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_pandas("release")
    checks = []

    release_suite = gx.ExpectationSuite(name="release")
    release_suite.add_expectation(gxe.ExpectTableColumnsToMatchSet(column_set=release_columns(spec), exact_match=True))
    checks.append(("output schema: declared columns only", None))
    text = data.astype(str)
    # Great Expectations copies a value set into every expectation and its result: with every
    # person's key that takes minutes. Only keys that occur among the release's values can match,
    # so those are the set it checks (empty: nothing to find, and the check passes as it would):
    # the released values whose hash is a person's.
    released = pd.Series(sorted({v for v in text.to_numpy().ravel() if len(v) >= MIN_KEY_LENGTH}), dtype=object)
    hashes = person_codes(released)
    found = persons[persons.isin(hashes.to_numpy())] if persons is not None and len(released) else []
    keys = released[hashes.isin(found)].tolist()
    for column in text.columns:
        for label, regex in PATTERNS.items():
            release_suite.add_expectation(gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=regex))
            checks.append((f"no {label}", column))
        release_suite.add_expectation(gxe.ExpectColumnValuesToNotBeInSet(column=column, value_set=keys))
        checks.append(("no person's key", column))
        if spec.release == "microdata" and len(text) > 1:
            release_suite.add_expectation(gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(column=column, max_value=0.999999))
            checks.append(("no column telling rows apart (row id)", column))

    profile_suite = gx.ExpectationSuite(name="groups")
    profile_suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="persons", min_value=spec.k))
    checks.append((f"every group holds at least k={spec.k} people", None))
    for s in spec.sensitive:
        profile_suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(
            column=f"{s.attribute.name}_distinct", min_value=spec.l))
        checks.append((f"every group shows at least l={spec.l} values of {s.attribute.name}", None))

    outcomes = []
    for name, frame, suite in (("release", text, release_suite), ("groups", profile, profile_suite)):
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame})
        outcomes += batch.validate(context.suites.add(suite)).results
    results = []
    for (check, column), outcome in zip(checks, outcomes):
        unexpected = (outcome.result or {}).get("unexpected_count")
        results.append({"check": check, "column": column, "success": bool(outcome.success),
                        "unexpected": int(unexpected) if unexpected is not None else (0 if outcome.success else 1)})
    return Validation(all(r["success"] for r in results), results)
