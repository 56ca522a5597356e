"""Validate a release with Great Expectations before anything is written or deleted.

Two batches are checked in an ephemeral context (a third only names the pattern that matched in
a column, when one did): the release itself (its columns are exactly the declared schema; no value
looks like an e-mail, phone number, IBAN, IP address or a per-person token; no value is a person's
key; in a row-level release, no column tells rows apart) and the profile of its groups (every group
holds k people and l distinct values of each sensitive attribute). Results keep counts only: the
unexpected values themselves could be personal data.
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
ANY_PATTERN = "no pattern of personal data"  # all of PATTERNS in one expectation, reported one by one
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
    # A run's log is its own: set before the import, which logs a hundred lines at INFO (its docs
    # registry), and after it for the one module that sets its own logger to INFO when imported.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    import great_expectations.expectations as gxe

    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_pandas("release")

    text = data.astype(str)
    # Great Expectations copies a value set into every expectation and its result: with every
    # person's key that takes minutes. Only keys that occur among the release's values can match,
    # so those are the set it checks (empty: nothing to find, and the check passes as it would):
    # the released values whose hash is a person's.
    released = pd.Series(sorted({v for v in text.to_numpy().ravel() if len(v) >= MIN_KEY_LENGTH}), dtype=object)
    hashes = person_codes(released)
    found = persons[persons.isin(hashes.to_numpy())] if persons is not None and len(released) else []
    keys = released[hashes.isin(found)].tolist()
    checks = [("output schema: declared columns only", None,
               gxe.ExpectTableColumnsToMatchSet(column_set=release_columns(spec), exact_match=True))]
    for column in text.columns:
        # Each expectation costs Great Expectations tens of milliseconds whatever the data: every
        # pattern is checked at once, and one by one only in a column where one of them matched.
        checks.append((ANY_PATTERN, column,
                       gxe.ExpectColumnValuesToNotMatchRegexList(column=column, regex_list=list(PATTERNS.values()))))
        checks.append(("no person's key", column, gxe.ExpectColumnValuesToNotBeInSet(column=column, value_set=keys)))
        if spec.release == "microdata" and len(text) > 1:
            checks.append(("no column telling rows apart (row id)", column,
                           gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(column=column, max_value=0.999999)))
    groups = [(f"every group holds at least k={spec.k} people", None,
               gxe.ExpectColumnValuesToBeBetween(column="persons", min_value=spec.k))]
    groups += [(f"every group shows at least l={spec.l} values of {s.attribute.name}", None,
                gxe.ExpectColumnValuesToBeBetween(column=f"{s.attribute.name}_distinct", min_value=spec.l))
               for s in spec.sensitive]

    results = _run(context, source, "release", text, checks) + _run(context, source, "groups", profile, groups)
    matched = [r["column"] for r in results if r["check"] == ANY_PATTERN and not r["success"]]
    by_pattern = _run(context, source, "patterns", text[matched], [
        (f"no {label}", column, gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=regex))
        for column in matched for label, regex in PATTERNS.items()]) if matched else []
    expanded = []
    for r in results:
        if r["check"] != ANY_PATTERN:
            expanded.append(r)
        elif r["success"]:  # no value matched any pattern, so none matched each one
            expanded += [{"check": f"no {label}", "column": r["column"], "success": True, "unexpected": 0}
                         for label in PATTERNS]
        else:
            expanded += [p for p in by_pattern if p["column"] == r["column"]]
    return Validation(all(r["success"] for r in expanded), expanded)


def _run(context, source, name: str, frame: pd.DataFrame, checks: list) -> list[dict]:
    """Validate `frame` against the expectations of `checks` ([(check, column, expectation)]);
    one result per check, with the count of unexpected values only."""
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=name)
    for _, _, expectation in checks:
        suite.add_expectation(expectation)
    batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all").get_batch(
        batch_parameters={"dataframe": frame})
    results = []
    for (check, column, _), outcome in zip(checks, batch.validate(context.suites.add(suite)).results):
        unexpected = (outcome.result or {}).get("unexpected_count")
        results.append({"check": check, "column": column, "success": bool(outcome.success),
                        "unexpected": int(unexpected) if unexpected is not None else (0 if outcome.success else 1)})
    return results
