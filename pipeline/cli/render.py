"""Every terminal table the CLI prints. The library returns records; this turns them into text.

Files (report.md, the Triton repository's README) are written by the stages themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.core.checks import PASSED, Check, headline, ordered
from pipeline.core.records import (
    ImageLoop,
    LatencyRow,
    OfflineRun,
    RegressionSection,
    ServerSection,
    by_reason,
    not_run_lines,
)
from pipeline.stages.bench.writeup import server_lines

if TYPE_CHECKING:  # verify loads numpy and the data modules: off the --help path
    from pipeline.core.capacity import CostTable
    from pipeline.stages.verify import GateResult, ParityReport


def checks_table(title: str, checks: list[Check], *, markdown: bool = False) -> str:
    """The CI view of a run: a headline, then one line per check, failures first. The same
    table goes to the terminal (text) and to a CI job summary (``markdown=True``)."""
    rows = [(c.status.upper() if c.status != PASSED else "ok", c.name, c.measured, c.limit,
             c.margin, c.message) for c in ordered(checks)]
    head = ("result", "check", "measured", "limit", "margin", "note")
    if markdown:
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")
        lines = [f"### {headline(title, checks)}", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i])
              for i in range(4)]
    lines = [headline(title, checks),
             "  ".join(h.ljust(w) for h, w in zip(head[:4], widths)) + "  margin; note"]
    for row in rows:
        tail = "; ".join(x for x in row[4:] if x)
        lines.append("  ".join(x.ljust(w) for x, w in zip(row[:4], widths)) + "  " + tail)
    return "\n".join(lines)


def parity_table(report: "ParityReport") -> str:
    rule = report.rule
    title = (f"parity vs eager PyTorch fp32 (atol {rule.atol:g}, rtol {rule.rtol:g})" if rule.allclose
             else f"parity vs eager PyTorch fp64 (tolerance {rule.floor_multiple:g} x the fp32 "
                  f"noise floor + {rule.scale_term:g} x max|logit|)")
    header = (f"{'candidate':<24} {'inputs':<11} {'max abs':>9} {'floor':>9} {'tolerance':>9} "
              f"{'margin':>7} {'top1':>5}  result")
    lines = [title, header]
    for pair in report.pairs:
        if pair.max_abs is None:
            lines.append(f"{pair.candidate:<24} {pair.inputs:<11} FAIL  {pair.error}")
            continue
        floor = f"{pair.fp32_floor:9.2e}" if pair.fp32_floor is not None else f"{'':>9}"
        tol = f"{pair.tolerance:9.2e}" if pair.tolerance is not None else f"{'':>9}"
        margin = f"{pair.margin:6.1f}x" if pair.margin is not None and pair.margin != float("inf") else f"{'':>7}"
        shown = pair.max_abs_vs_fp64 if pair.max_abs_vs_fp64 is not None else pair.max_abs
        lines.append(f"{pair.candidate:<24} {pair.inputs:<11} {shown:9.2e} {floor} {tol} {margin} "
                     f"{pair.top1:5.2f}  {'ok' if pair.passed else 'FAIL'}")
    for reason, keys in by_reason(report.skipped.items()).items():  # one line per reason
        lines.append(f"{keys[0]:<24} skipped: {reason}" if len(keys) == 1 else
                     f"skipped: {reason}: {len(keys)} candidates ({', '.join(keys)})")
    lines += gate_lines(report)
    lines += localization_lines(report)
    return "\n".join(lines)


def localization_lines(report: "ParityReport") -> list[str]:
    """``verify --localize``: the first layer each candidate diverges at (fp32), or the
    layers with the largest share of int8's logit error."""
    lines: list[str] = []
    for found in report.localized:
        where = f"{found.candidate} on {found.inputs} ({found.batch} rows, {found.layers_compared} layers)"
        lines.append("")
        if found.first_divergent is not None:
            layer = found.first_divergent
            lines.append(f"localize {where}: first divergent layer #{layer.index} "
                         f"{layer.pytorch} = {layer.op} {layer.artifact} (tensor {layer.tensor}): "
                         f"max abs vs fp64 {layer.max_abs_vs_fp64:.3e} > tolerance "
                         f"{layer.tolerance:.3e} (fp32 floor {layer.fp32_floor:.2e})")
        elif found.logit_relative_error is not None:
            lines.append(f"localize {where}: logit error {100 * found.logit_relative_error:.2f}% "
                         f"(relative L2 vs eager fp32); largest shares, each layer quantized alone:")
            lines.append(f"  {'layer (PyTorch)':<44} {'node':<22} {'rel err':>8} {'share':>7}")
            for layer in found.largest:
                share = (f"{100 * layer.logit_error_share:6.1f}%" if layer.logit_error_share
                         is not None else f"{'—':>7}")
                lines.append(f"  {layer.pytorch:<44} {layer.artifact:<22} "
                             f"{100 * (layer.relative_error or 0.0):7.2f}% {share}")
        else:
            lines.append(f"localize {where}: {found.note}")
            for layer in found.largest:
                lines.append(f"  closest to its tolerance: {layer.pytorch} ({layer.artifact}) "
                             f"{layer.max_abs_vs_fp64:.2e} of {layer.tolerance:.2e}")
    return lines


def gate_lines(report: "ParityReport") -> list[str]:
    if not report.gates and not report.not_verified:
        return []
    lines = [""]
    rule = report.gate_rule
    if rule is not None:
        level = f", each shown at {100 * rule.confidence:g}% confidence" if rule.confidence else ""
        lines.append(f"accuracy gate vs eager fp32 (top-1 drop <= {rule.max_top1_drop_points:g} "
                     f"points, agreement >= {100 * rule.min_top1_agreement:g}%{level})")
    if report.evaluation:
        ev = report.evaluation
        lines.append(f"evaluation: {ev.images} images from {ev.source}; held apart from "
                     f"calibration: {ev.held_apart_from_calibration}")
    lines.append(f"{'candidate':<24} {'ran as':<8} {'agree':>7} {'top5':>6} {'cosine':>8} "
                 f"{'fp32 acc':>8} {'acc':>7} {'drop':>6}  result")
    for gate in report.gates:
        if gate.error:
            lines.append(f"{gate.candidate:<24} {gate.not_meaningful or 'FAIL'}  {gate.error}")
            continue
        acc = (f"{100 * gate.fp32_top1:7.2f}% {100 * gate.candidate_top1:6.2f}% "
               f"{gate.top1_drop_points:6.2f}" if gate.fp32_top1 is not None else f"{'—':>8} {'—':>7} {'—':>6}")
        lines.append(f"{gate.candidate:<24} {gate.precision or '':<8} {100 * gate.top1_agreement:6.2f}% "
                     f"{100 * gate.top5_agreement:5.1f}% {gate.cosine_mean:8.5f} {acc}  "
                     f"{gate_verdict(gate)}")
    lines += [f"{key:<24} not verified: {reason}" for key, reason in report.not_verified.items()]
    return lines



def latency_table(rows: list[LatencyRow]) -> str:
    lines = [f"{'backend':<20} {'precision':<10} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'ms/img':>8} "
             f"{'img/s':>9} {'GFLOP/s':>8}  {'verified':<14} provider"]
    for row in rows:
        precision = row.precision_label
        if row.status == "unavailable":
            continue  # one line per reason, below
        if not row.ok:
            lines.append(f"{row.backend:<20} {precision:<10} {row.batch:>5}  {row.status}: {row.reason}")
            continue
        gflops = f"{row.gflops:8.1f}" if row.gflops else f"{'':>8}"
        lines.append(f"{row.backend:<20} {precision:<10} {row.batch:>5} {row.p50_ms:9.2f} "
                     f"{row.p90_ms:9.2f} {row.ms_per_image:8.2f} {row.images_per_s:9.1f} "
                     f"{gflops}  {row.verified:<14} {row.provider}")
    lines += [f"not run: {line}" for line in not_run_lines(rows)]
    return "\n".join(lines)


def regression_table(section: RegressionSection) -> str:
    """``bench --baseline``: each row against the baseline's, with the test's p-value."""
    how = "re-measured in this run, alternating windows" if section.rerun else "from the file"
    lines = [f"regression gate vs {section.baseline} ({how}): slower than "
             f"{100 * section.max_slowdown:g}% and p < {section.alpha:g} fails "
             f"(one-sided Mann-Whitney U over windows of 25 calls)"]
    lines += [f"note: {note}" for note in section.notes]
    lines.append(f"{'target':<24} {'batch':>5} {'baseline/s':>11} {'now/s':>9} {'ratio':>7} "
                 f"{'p':>8} {'windows':>8}  result")
    for row in section.rows:
        if row.status == "not comparable":
            lines.append(f"{row.target:<24} {row.batch:>5}  not comparable: {row.reason}")
            continue
        windows = f"{row.windows[0]}+{row.windows[1]}" if row.windows else ""
        lines.append(f"{row.target:<24} {row.batch:>5} {row.baseline_per_s:11.1f} "
                     f"{row.now_per_s:9.1f} {row.now_per_s / row.baseline_per_s:6.3f}x "
                     f"{row.p_value:8.3g} {windows:>8}  "
                     + ("REGRESSED" if row.status == "regressed" else "ok"))
    return "\n".join(lines)


def gate_verdict(gate: "GateResult") -> str:
    if gate.not_meaningful:
        return gate.not_meaningful
    bounds = ""
    if gate.disagreement_bounds:
        low, high = gate.disagreement_bounds
        bounds = f" [agreement {100 * (1 - high):.2f}-{100 * (1 - low):.2f}%"
        if gate.drop_bounds_points:
            bounds += f", drop {gate.drop_bounds_points[0]:+.2f} to {gate.drop_bounds_points[1]:+.2f}"
        bounds += "]"
    if gate.passed:
        return "pass" + bounds
    word = "INCONCLUSIVE" if gate.verdict == "inconclusive" else "FAIL"
    if gate.accepted_inconclusive:
        return f"inconclusive, accepted (not recommended): {gate.failed_on or ''}"
    return (f"{word}: " if gate.decides_exit else f"advisory {word} (not recommended): ") + \
        (gate.failed_on or "")


def server_table(server: ServerSection | None) -> str:
    """The server scenario as report.md shows it."""
    return "\n".join(server_lines(server))


def image_loops(loops: list[ImageLoop], *, verbose: bool = False) -> list[str]:
    """``bench --images``: the write-ups' own summary line per backend, the decode and
    inference medians, both loops' images/s; with ``verbose`` every ``i/N: name`` line first."""
    lines: list[str] = []
    for loop in loops:
        sequential, pipelined = loop.sequential, loop.pipelined
        if verbose:
            lines += sequential.lines
        lines.append(f"[{loop.backend}] {loop.summary}")
        if sequential.decode and sequential.infer:
            lines.append(f"[{loop.backend}] decode+preprocess p50 {sequential.decode.p50_ms:.2f} ms, "
                         f"inference p50 {sequential.infer.p50_ms:.2f} ms; sequential "
                         f"{sequential.images_per_s:.1f} img/s, pipelined "
                         f"({pipelined.workers} workers) {pipelined.images_per_s:.1f} img/s")
    return lines


def archs_table(rows: list[dict[str, Any]]) -> str:
    """``archs``: parameters, GMACs, input size and preprocessing of every architecture."""
    def triple(values: list[float]) -> str:
        return "(" + ", ".join(f"{v:g}" for v in values) + ")"

    lines = [f"{'arch':<16} {'params':>8} {'GMACs':>7} {'input':>5}  preprocessing"]
    for row in rows:
        prep = row["preprocessing"]
        lines.append(f"{row['arch']:<16} {row['params'] / 1e6:7.2f}M {row['gmacs']:7.3f} "
                     f"{row['input_size']:>5}  resize {prep['resize']}, crop {prep['crop']}, "
                     f"mean {triple(prep['mean'])}, std {triple(prep['std'])}")
    return "\n".join(lines)


def offline_table(run: OfflineRun) -> str:
    """The offline scenario: the two ceilings, the bound they set, and the end-to-end rate."""
    lines = [f"offline scenario: {run.files} files, {run.target} at batch {run.batch} "
             f"({run.choice}); {run.machine.cpu}, {run.cores} cores",
             f"{'':<34} {'img/s':>9}",
             f"{'decode only (' + str(run.cores) + ' processes)':<34} {run.decode_only_per_s:9.1f}",
             f"{'inference only (' + str(run.cores) + ' threads)':<34} {run.infer_only_per_s:9.1f}",
             f"{'shared-core bound 1/(1/D+1/I)':<34} {run.shared_core_bound_per_s:9.1f}",
             f"{'end to end (predict engine)':<34} {run.end_to_end_per_s:9.1f}  "
             f"{run.ratio_to_bound:.2f}x the bound",
             f"split: {run.split}"]
    if run.errors:
        lines.append(f"{run.errors} file(s) could not be classified")
    return "\n".join(lines)


def cost_answer(table: CostTable) -> list[str]:
    """report's cost answer on the terminal: the cheapest within the bound, the fastest."""
    where = table.scope
    lines = []
    cheap, fast = table.cheapest, table.fastest
    if cheap is None:
        lines.append(f"cheapest {where}: none (no priced, verified configuration)")
    elif table.target_rate is not None:
        lines.append(f"cheapest {where} for {table.target_rate}: {cheap.name}, "
                     f"{_count(cheap.replicas, 'replica')}, ${cheap.fleet_usd_per_hour:.3f}/h")
    else:
        per_million = table.per_million(cheap)
        lines.append(f"cheapest {where}: {cheap.name}, ${per_million:.4f} per million images")
    if fast is not None:
        speed = table.speed(fast)
        lines.append(f"fastest {where}: {fast.name}, {speed:.1f} images/s per replica"
                     + (f", {_count(fast.replicas, 'replica')}" if fast.replicas is not None else ""))
    return lines + [f"note: {note}" for note in table.notes]


def _count(n: int | None, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
