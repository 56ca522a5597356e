"""The blast-radius guard: before anything is applied, a table where a run would change more rows
than its limits allow stops the whole run, with the rule, the table and the counts. Only an
explicit `force` lets it through, and the override is recorded in the audit trail."""

from __future__ import annotations

from dataclasses import dataclass

from .decide import CHANGING
from .rules import Rules


class BlastRadiusExceeded(Exception):
    def __init__(self, violations: list["Violation"]):
        self.violations = violations
        lines = [v.message for v in violations]
        super().__init__(
            "the run would change more than the blast-radius limits allow; nothing was changed:\n  "
            + "\n  ".join(lines)
            + "\nIf this is intended (a first run over a backlog, a deliberate rule change), run again with "
              "--force (DAG param force=true): the override is recorded in the audit trail and the report."
        )


@dataclass(frozen=True)
class Violation:
    system: str
    table: str
    rule: str
    changing: int
    total: int
    max_share: float
    max_rows: int

    @property
    def message(self) -> str:
        return (f"{self.system}.{self.table}: {self.changing} of {self.total} rows "
                f"({self.changing / self.total:.0%}) would change, mostly under rule {self.rule}; "
                f"limits {self.max_share:.0%} and {self.max_rows} rows")


def check(rules: Rules, tally) -> list[Violation]:
    totals: dict = {}
    changing: dict = {}
    for (system, table, action), n in tally.records.items():
        totals[(system, table)] = totals.get((system, table), 0) + n
        if action in CHANGING:
            changing[(system, table)] = changing.get((system, table), 0) + n
    violations = []
    for (system, table), count in sorted(changing.items()):
        limits = rules.system(system).tables[table].blast_radius or rules.settings.blast_radius
        total = totals[(system, table)]
        over_share = total >= limits.min_rows and count / total > limits.max_share
        if over_share or count > limits.max_rows:
            by_rule = {r: n for (s, t, r, a), n in tally.by_rule.items() if (s, t) == (system, table) and a in CHANGING}
            rule = max(by_rule, key=by_rule.get)
            violations.append(Violation(system, table, rule, count, total, limits.max_share, limits.max_rows))
    return violations
