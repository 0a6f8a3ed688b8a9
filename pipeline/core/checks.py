"""What CI shows: every verdict of verify and bench as one ``Check``, written as JUnit XML.

A check is one parity pair (candidate x inputs), one accuracy gate, one bench row or one
regression test. Its message carries the measured value, the limit, the margin and, for a
gate, the verdict with its confidence interval, so a failed check in a CI system's test list
says why without a log to scroll (tt-xla writes its measured value and threshold into each
case the same way). The XML follows the JUnit schema CI systems read (Jenkins' junit-10.xsd,
which GitHub, GitLab and Azure accept too) and is written with ``xml.etree``; the tests
validate it against that schema.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.bundle import write_text_atomic

if TYPE_CHECKING:
    from pipeline.core.records import (
        GateResult,
        GateRule,
        LatencyDoc,
        PairResult,
        ParityReport,
        ParityRule,
        RegressionSection,
    )

PASSED, FAILED, ERROR, SKIPPED = "passed", "failed", "error", "skipped"
ORDER = {FAILED: 0, ERROR: 1, SKIPPED: 2, PASSED: 3}  # what a reader must see first


@dataclass(frozen=True)
class Check:
    """One verdict: ``status`` is passed, failed (a limit was exceeded), error (it could not
    be judged: a crash, a file that cannot run) or skipped (not run here, with the reason)."""

    group: str  # verify.parity, verify.gate, bench.row, bench.regression ...
    name: str
    status: str
    measured: str = ""
    limit: str = ""
    margin: str = ""
    message: str = ""  # the reason for anything but a pass; a pass's verdict in words

    @property
    def line(self) -> str:
        """Measured, limit, margin and message in one line (the JUnit failure message)."""
        parts = [f"measured {self.measured}" if self.measured else "",
                 f"limit {self.limit}" if self.limit else "",
                 f"margin {self.margin}" if self.margin else "", self.message]
        return "; ".join(p for p in parts if p)


def integrity_failure(message: str) -> Check:
    """A changed file: verify stops before any pair runs, so this is its one case."""
    return Check("verify.integrity", "integrity", ERROR, message=message)


def ordered(checks: list[Check]) -> list[Check]:
    """Failures first, then errors, skipped, passed; otherwise in the order they ran."""
    return sorted(checks, key=lambda c: ORDER[c.status])


def headline(title: str, checks: list[Check]) -> str:
    counts = {status: sum(c.status == status for c in checks) for status in ORDER}
    verdict = "FAILED" if counts[FAILED] or counts[ERROR] else "passed"
    return (f"{title} {verdict}: {counts[PASSED]} passed, {counts[FAILED]} failed, "
            f"{counts[ERROR]} error(s), {counts[SKIPPED]} skipped")


# ----------------------------------------------------------------------------- verify
def parity_checks(report: "ParityReport") -> list[Check]:
    """One check per parity pair, per skipped candidate, per gate and per backend verify
    could not run here, plus the integrity check of the files' sha256."""
    files = report.integrity_checked
    checks = [Check("verify.integrity", f"integrity ({len(files)} files)", PASSED,
                    message="sha256 matches the manifest: " + ", ".join(files))] if files else []
    checks += [_pair_check(pair, report.rule) for pair in report.pairs]
    checks += [Check("verify.parity", key, SKIPPED, message=reason)
               for key, reason in report.skipped.items()]
    checks += [_gate_check(gate, report.gate_rule) for gate in report.gates]
    checks += [Check("verify.gate", f"gate {key}", SKIPPED, message=f"not verified: {reason}")
               for key, reason in report.not_verified.items()]
    if not report.has_cpu_onnx_pair:
        checks.append(Check("verify.parity", "a CPU ONNX comparison", ERROR,
                            message="no CPU ONNX comparison ran, so nothing was verified"))
    return checks


def _pair_check(pair: "PairResult", rule: "ParityRule") -> Check:
    name = f"{pair.candidate} on {pair.inputs}"
    if pair.max_abs is None:
        return Check("verify.parity", name, ERROR, message=pair.error or "no result")
    if pair.tolerance is not None:  # the floor rule
        measured = f"max abs error vs fp64 {pair.max_abs_vs_fp64:.3e}"
        limit = f"tolerance {pair.tolerance:.3e} (fp32 floor {pair.fp32_floor:.2e})"
        margin = f"{pair.margin:.2f}x" if pair.margin not in (None, float("inf")) else "inf"
    else:
        measured = f"max abs error {pair.max_abs:.3e}, max rel {pair.max_rel:.3e}"
        limit = f"atol {rule.atol:g} + rtol {rule.rtol:g} x |reference|"
        margin = ""
    status = PASSED if pair.passed else FAILED
    message = "within tolerance" if pair.passed else (pair.error or "exceeds its tolerance")
    return Check("verify.parity", name, status, measured, limit, margin, message)


def _gate_check(gate: "GateResult", rule: "GateRule | None") -> Check:
    name = f"gate {gate.candidate}"
    if gate.not_meaningful:
        return Check("verify.gate", name, SKIPPED, message=gate.not_meaningful)
    if gate.top1_agreement is None:
        return Check("verify.gate", name, ERROR, message=gate.error or gate.failed_on or "no result")
    measured = f"agreement {100 * gate.top1_agreement:.2f}%"
    if gate.disagreements is not None:
        measured += f" ({gate.disagreements} of {gate.images} disagree)"
    if gate.top1_drop_points is not None:
        measured += f", top-1 drop {gate.top1_drop_points:+.2f} points"
    limit = (f"agreement >= {100 * rule.min_top1_agreement:g}%, drop <= "
             f"{rule.max_top1_drop_points:g} points") if rule is not None else ""
    margin = ""
    if gate.disagreement_bounds:
        low, high = gate.disagreement_bounds
        margin = (f"agreement {100 * (1 - high):.2f}-{100 * (1 - low):.2f}% at "
                  f"{100 * (gate.confidence or 0.95):g}% confidence")
        if gate.drop_bounds_points:
            margin += f", drop {gate.drop_bounds_points[0]:+.2f} to {gate.drop_bounds_points[1]:+.2f}"
    verdict = gate.verdict or "fail"
    if gate.passed:
        return Check("verify.gate", name, PASSED, measured, limit, margin, f"verdict {verdict}")
    if gate.accepted_inconclusive:
        return Check("verify.gate", name, PASSED, measured, limit, margin,
                     f"verdict inconclusive, accepted (never recommended): {gate.failed_on}")
    if not gate.decides_exit:
        return Check("verify.gate", name, SKIPPED, measured, limit, margin,
                     f"advisory: verdict {verdict}, a runtime-only precision that does not "
                     f"decide the exit code (never recommended): {gate.failed_on}")
    return Check("verify.gate", name, FAILED, measured, limit, margin,
                 f"verdict {verdict}: {gate.failed_on or gate.error or ''}")


# ----------------------------------------------------------------------------- bench
def latency_checks(doc: "LatencyDoc", budget_ms: float | None = None) -> list[Check]:
    """One check per bench row: measured when it ran (a failure when its p90 is over
    ``budget_ms``), skipped with its reason when it could not run here, an error when it
    crashed."""
    checks = []
    for row in doc.rows:
        name = f"{row.target} batch {row.batch}"
        if row.status == "unavailable":
            checks.append(Check("bench.row", name, SKIPPED, message=row.reason or "not run here"))
            continue
        if not row.ok:
            checks.append(Check("bench.row", name, ERROR, message=row.reason or row.status))
            continue
        measured = (f"p50 {row.p50_ms:.2f} ms, p90 {row.p90_ms:.2f} ms, "
                    f"{row.images_per_s:.1f} images/s")
        if budget_ms is None:
            checks.append(Check("bench.row", name, PASSED, measured, message=row.verified))
            continue
        over = row.p90_ms > budget_ms
        checks.append(Check("bench.row", name, FAILED if over else PASSED, measured,
                            f"p90 <= {budget_ms:g} ms", f"{budget_ms / row.p90_ms:.2f}x",
                            "over the latency budget" if over else row.verified))
    if doc.regression is not None:
        checks += regression_checks(doc.regression)
    return checks


def regression_checks(section: "RegressionSection") -> list[Check]:
    """One check per row the regression gate judged: regressed is a failure, not comparable
    is skipped with its reason (never a pass)."""
    checks = []
    limit = f"slowdown <= {100 * section.max_slowdown:g}%"
    for row in section.rows:
        name = f"{row.target} batch {row.batch} vs baseline"
        if row.status == "not comparable":
            checks.append(Check("bench.regression", name, SKIPPED, limit=limit,
                                message=f"not comparable: {row.reason}"))
            continue
        measured = (f"{row.now_per_s:.1f} images/s, baseline {row.baseline_per_s:.1f} "
                    f"({100 * row.slowdown:+.1f}%)")
        windows = f"{row.windows[0]} and {row.windows[1]} windows" if row.windows else ""
        margin = f"p = {row.p_value:.3g} ({windows})"
        regressed = row.status == "regressed"
        checks.append(Check("bench.regression", name, FAILED if regressed else PASSED, measured,
                            limit, margin, "slower than allowed, beyond the noise" if regressed
                            else "within the allowed slowdown or the noise"))
    return checks


# ----------------------------------------------------------------------------- JUnit XML
def junit_xml(suite: str, checks: list[Check], *, seconds: float = 0.0) -> str:
    """The checks as one JUnit ``testsuite`` inside ``testsuites``. Every case carries its
    figures in ``system-out``; a failure or an error carries them in its message too."""
    import socket
    import xml.etree.ElementTree as ET  # off the CLI's start-up path: only --junit-xml needs it

    counts = {status: sum(c.status == status for c in checks) for status in ORDER}
    root = ET.Element("testsuites", name=f"pipeline {suite}", tests=str(len(checks)),
                      failures=str(counts[FAILED]), errors=str(counts[ERROR]),
                      time=f"{seconds:.3f}")
    node = ET.SubElement(root, "testsuite", name=f"pipeline {suite}", tests=str(len(checks)),
                         failures=str(counts[FAILED]), errors=str(counts[ERROR]),
                         skipped=str(counts[SKIPPED]), time=f"{seconds:.3f}",
                         timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
                         hostname=socket.gethostname())
    for check in checks:
        case = ET.SubElement(node, "testcase", name=check.name, classname=f"pipeline.{check.group}",
                             time="0")
        if check.status == FAILED:
            ET.SubElement(case, "failure", message=check.line, type=check.group).text = check.line
        elif check.status == ERROR:
            ET.SubElement(case, "error", message=check.line, type=check.group).text = check.line
        elif check.status == SKIPPED:
            ET.SubElement(case, "skipped", message=check.line)
        ET.SubElement(case, "system-out").text = check.line
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: Path | str, suite: str, checks: list[Check], *, seconds: float = 0.0) -> Path:
    """``junit_xml`` written atomically to ``path`` (its folder made if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, junit_xml(suite, checks, seconds=seconds))
    return path
