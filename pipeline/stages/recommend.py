"""Which timed row may be recommended, and the recommendation.

A row is matched with verify's results (parity.json) for the very backend and model file it
timed: fp32 rows by the parity pairs verify ran on that backend (or the one it is verified as)
on that file, reduced precision by the accuracy gate of the same backend and precision. A
backend verify did not run says so and is never recommended; only fp32 rows whose parity held
(or that no verify has judged yet) and reduced-precision rows whose gate passed are eligible.
"""

from __future__ import annotations

from pipeline.core.records import (
    NOT_ON_THIS_MACHINE,
    Advice,
    LatencyRow,
    ParityReport,
    Recommendation,
    ok_rows,
    target_name,
)
from pipeline.runtimes.registry import BACKENDS


def attach_verification(rows: list[LatencyRow], parity: ParityReport | None) -> None:
    """Say for each row whether verify vouched for the very backend and model file it timed.

    fp32 rows: the parity pairs verify ran on the same backend and file (sha256); eager torch
    is the reference itself. A backend verify did not run is ``not verified on this machine``,
    whatever else ran the same file. Reduced precision: the accuracy gate of the same backend
    and precision on the same file. Anything else is ``not verified``, and ``recommend`` never
    picks a reduced precision that is.
    """
    pairs = parity.pairs if parity else []
    gates = {g.candidate: g for g in parity.gates} if parity else {}
    for row in rows:
        backend = BACKENDS.get(row.backend)
        row.verified, row.top1_agreement, row.top1_drop_points = "not verified", None, None
        if backend is None or row.model_sha256 is None:
            continue
        if row.requested == "fp32":
            if backend.runtime == "torch":
                row.verified = "reference"
                continue
            ran = [p for p in pairs if p.backend == backend.verified_as]
            same = [p for p in ran if p.model_sha256 == row.model_sha256]
            if same:
                row.verified = "parity passed" if all(p.passed for p in same) else "parity failed"
            elif parity is not None and not ran:
                row.verified = NOT_ON_THIS_MACHINE
            continue
        gate = gates.get(target_name(backend.gate_as or backend.name, row.requested))
        if gate and gate.model_sha256 == row.model_sha256:
            row.verified = gate.status  # passed, inconclusive (needs N images), failed ...
            row.top1_agreement, row.top1_drop_points = gate.top1_agreement, gate.top1_drop_points


def eligible(row: LatencyRow) -> bool:
    """May this row be recommended? The rule is the row's own (``LatencyRow.recommendable``),
    so the cost ranking (``core.capacity``) applies the same one."""
    return row.recommendable


def recommend(rows: list[LatencyRow], budget_ms: float | None = None) -> Recommendation:
    """The fastest verified (backend, precision) at batch 1 (best latency) and its cost
    against the fastest fp32; the verified row with the most images/s at any batch (best
    throughput); who meets a p90 budget; where the GPU overtakes the CPU; what was not verified."""
    good = ok_rows(rows)
    usable = [r for r in good if eligible(r)]
    batch1 = sorted((r for r in usable if r.batch == 1), key=lambda r: r.p50_ms)
    fp32 = [r for r in batch1 if r.requested == "fp32"]
    answer = Recommendation(budget_ms=budget_ms,
                            not_verified=sorted({r.target for r in good if not eligible(r)}))
    if batch1:
        answer.fastest_batch1 = Advice.of(batch1[0])
    if usable:
        answer.best_throughput = Advice.of(max(usable, key=lambda r: r.images_per_s or 0.0))
    if fp32:
        answer.fastest_fp32_batch1 = Advice.of(fp32[0])
        answer.speedup_vs_fp32 = fp32[0].p50_ms / batch1[0].p50_ms
    if budget_ms is not None:
        answer.meets_budget = [Advice.of(r) for r in sorted(usable, key=lambda r: (r.batch, r.p90_ms))
                               if r.p90_ms <= budget_ms]
    answer.gpu_overtakes_cpu_at_batch, answer.gpu_vs_cpu = _gpu_crossover(usable)
    return answer


def _gpu_crossover(good: list[LatencyRow]) -> tuple[int | None, dict[str, float] | str]:
    """The first batch at which the best GPU row beats the best CPU row in images/s, and the
    GPU/CPU ratio per batch (or why there is none)."""
    best: dict[tuple[str, int], float] = {}
    for row in good:
        key = ("gpu" if row.device == "cuda" else "cpu", row.batch)
        best[key] = max(best.get(key, 0.0), row.images_per_s)
    batches = sorted({batch for kind, batch in best if (("cpu", batch) in best and ("gpu", batch) in best)})
    if not batches:
        return None, "not measured: needs both a CPU and a GPU backend"
    table = {b: best[("gpu", b)] / best[("cpu", b)] for b in batches}
    over = next((b for b in batches if table[b] > 1.0), None)
    return over, {str(b): round(ratio, 2) for b, ratio in table.items()}
