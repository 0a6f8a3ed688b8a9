"""bench's own write-up: latency.json, report.md and latency.png in the bundle, and the tables
and recommendation lines that report's comparison across machines reuses.

bench is the producer and writes its own files; ``pipeline.stages.report`` (the merge of
several machines' latency.json) imports this module, never the reverse. The terminal tables
are the CLI's (``pipeline.cli.render``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.core.bundle import (
    BENCH_FILES,
    LATENCY,
    LATENCY_PLOT,
    REPORT,
    Bundle,
    save_atomic,
    write_text_atomic,
)
from pipeline.core.records import (
    Advice,
    ImageLoop,
    LatencyDoc,
    LatencyRow,
    PoissonSearch,
    Recommendation,
    ServerRow,
    ServerSection,
    MODEL_ROLE,
    not_run_lines,
    ok_rows,
    read_parity,
)
from pipeline.stages.recommend import recommend


def labelled_rows(docs: list[LatencyDoc]) -> list[LatencyRow]:
    """Every row tagged with its machine, so rows from several machines can share a table."""
    return [replace(row, machine=doc.machine_label, arch=doc.model.arch)
            for doc in docs for row in doc.rows]


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def rows_table(rows: list[LatencyRow], *, with_machine: bool) -> list[str]:
    head = ["machine"] if with_machine else []
    head += ["backend", "precision", "batch", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "mean ± std ms",
             "n", "ms/image", "images/s", "GFLOP/s", "cold create ms", "first infer ms", "verified",
             "provider"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row.status == "unavailable":
            continue  # one line per reason, below the table
        cells = [row.machine or ""] if with_machine else []
        if not row.ok:
            cells += [row.backend, row.precision_label, str(row.batch),
                      f"**{row.status}**: {row.reason}"]
            cells += [""] * (len(head) - len(cells))
        else:
            cells += [row.backend, row.precision_label, str(row.batch), _fmt(row.p50_ms),
                      _fmt(row.p90_ms),
                      _fmt(row.p95_ms), _fmt(row.p99_ms) if row.p99_ms is not None else "omitted (n<600)",
                      f"{row.mean_ms:.2f} ± {row.std_ms:.2f}", str(row.n),
                      _fmt(row.ms_per_image, ".3f"), _fmt(row.images_per_s, ".1f"),
                      _fmt(row.gflops, ".1f"), _fmt(row.cold_create_ms, ".0f"),
                      _fmt(row.cold_first_infer_ms, ".0f"), _verified(row), str(row.provider)]
        lines.append("| " + " | ".join(cells) + " |")
    not_run = not_run_lines(rows)
    if not_run:
        lines += ["", "Not run here (each target's reason is in latency.json):", ""]
        lines += [f"- {line}" for line in not_run]
    return lines


def _verified(row: LatencyRow) -> str:
    text = row.verified or "not verified"
    if row.top1_agreement is not None:
        text += f" (agreement {100 * row.top1_agreement:.1f}%"
        if row.top1_drop_points is not None:
            text += f", top-1 {0.0 - row.top1_drop_points + 0.0:+.2f} pts"
        text += ")"
    return text


def accuracy_cost(choice: Advice) -> str:
    if choice.top1_agreement is None:
        fp32 = (choice.precision_requested or "fp32") == "fp32"
        return "fp32: no accuracy cost" if fp32 else ""
    cost = f"top-1 agreement with fp32 {100 * choice.top1_agreement:.2f}%"
    if choice.top1_drop_points is not None:
        cost += f", top-1 accuracy {0.0 - choice.top1_drop_points + 0.0:+.2f} points"
    return cost


def _row_name(row: LatencyRow) -> str:
    return f"{row.backend} {row.precision_label}"


def recommendation_lines(advice: Recommendation) -> list[str]:
    lines = ["## Recommendation", ""]
    best = advice.fastest_batch1
    if best:
        where = f" on {best.machine}" if best.machine else ""
        lines.append(f"- Best latency, the fastest verified model at batch 1: **{best.name}**{where} "
                     f"(p50 {best.p50_ms:.2f} ms, p90 {best.p90_ms:.2f} ms; {accuracy_cost(best)}).")
        fp32 = advice.fastest_fp32_batch1
        if fp32 and fp32 != best:
            lines.append(f"- That is {advice.speedup_vs_fp32:.2f}x the fastest fp32, "
                         f"{fp32.name} (p50 {fp32.p50_ms:.2f} ms).")
    else:
        lines.append("- No verified backend produced numbers.")
    bulk = advice.best_throughput
    if bulk:
        where = f" on {bulk.machine}" if bulk.machine else ""
        steady = "" if bulk.stable is not False else "; unstable windows"
        lines.append(f"- Best throughput (verified): **{bulk.name}** at batch {bulk.batch}"
                     f"{where}: {bulk.images_per_s:.1f} images/s (p50 {bulk.p50_ms:.2f} ms "
                     f"per call{steady}; {accuracy_cost(bulk)}).")
    if advice.not_verified:
        lines.append(f"- Not verified, so never recommended: {', '.join(advice.not_verified)} "
                     f"(run `python -m pipeline verify` with evaluation images, then bench again).")
    if advice.budget_ms is not None:
        names = ", ".join(f"{m.name} @ batch {m.batch} ({m.p90_ms:.2f} ms)"
                          + (f" [{m.machine}]" if m.machine else "")
                          for m in advice.meets_budget or [])
        lines.append(f"- Meets the {advice.budget_ms:g} ms budget at p90: {names or 'none'}.")
    crossover = advice.gpu_vs_cpu
    if isinstance(crossover, dict):
        at = advice.gpu_overtakes_cpu_at_batch
        ratios = ", ".join(f"batch {b}: {r}x" for b, r in crossover.items())
        lines.append(f"- GPU vs CPU throughput (best of each): {ratios}. "
                     + (f"The GPU overtakes the CPU at batch {at}." if at else
                        "The GPU did not overtake the CPU at the measured batch sizes."))
    else:
        lines.append(f"- GPU vs CPU: {crossover}.")
    return lines + [""]


def image_loop_lines(loops: list[ImageLoop]) -> list[str]:
    if not loops:
        return []
    lines = ["## Per-image loop over real files", "",
             "| backend | summary | decode p50 ms | infer p50 ms | sequential img/s | pipelined img/s |",
             "|---|---|---|---|---|---|"]
    for loop in loops:
        seq, pipe = loop.sequential, loop.pipelined
        lines.append(f"| {loop.backend} | `{loop.summary}` | {_fmt(seq.decode.p50_ms if seq.decode else None)} | "
                     f"{_fmt(seq.infer.p50_ms if seq.infer else None)} | {_fmt(seq.images_per_s, '.1f')} | "
                     f"{_fmt(pipe.images_per_s, '.1f')} ({pipe.workers} workers) |")
    return lines + [""]


def machine_lines(doc: LatencyDoc) -> list[str]:
    machine, config = doc.machine, doc.config
    gpu = machine.gpu
    versions = ", ".join(f"{k} {v}" for k, v in machine.versions.items() if v)
    flags = " ".join(machine.flags)
    return [f"- Machine label: {machine.name} (hostname {machine.hostname})",
            f"- CPU: {machine.cpu} ({machine.cpu_count} logical cores; flags: {flags or 'none of note'})",
            f"- GPU: {gpu.name}, driver {gpu.driver}, CUDA {gpu.cuda_runtime}" if gpu else "- GPU: none",
            f"- Threads for every CPU backend: {config.threads}",
            f"- Protocol: warm-up >= {config.min_warmup_iterations or '?'} iterations and >= "
            f"{config.warmup_s} s; timed until >= {config.iterations} iterations and >= "
            f"{config.seconds} s; TF32 off on GPU",
            f"- Versions: {versions}", ""]


def bench_markdown(doc: LatencyDoc, advice: Recommendation) -> str:
    model = doc.model
    gmacs = "?" if model.gmacs_per_image is None else f"{model.gmacs_per_image:.3f}"
    lines = [f"# Latency: {model.arch} at {model.input_size} px", "",
             f"Command: `{doc.command or 'python -m pipeline bench'}`", "",
             f"Created {doc.created}; {gmacs} GMACs per image; ONNX file {model.onnx_file}.", ""]
    lines += machine_lines(doc)
    lines += recommendation_lines(advice)
    lines += ["## Results", ""] + rows_table(labelled_rows([doc]), with_machine=False) + [""]
    lines += image_loop_lines(doc.images)
    lines += server_lines(doc.server)
    return "\n".join(lines)


# The server's targets (issue 18): at concurrency 1 its p50 within the in-process p50 plus the
# configured queue delay plus this much; at its best concurrency this share of the in-process
# batching ceiling; and, where batching pays (a GPU), this multiple of in-process batch 1.
OVERHEAD_BUDGET_MS = 3.0
CEILING_SHARE = 0.9
BATCHING_GAIN = 1.3


def server_lines(server: ServerSection | None) -> list[str]:
    """The server scenario: throughput and latency per concurrency against the in-process
    baselines, where each level's time goes, the targets, and the Poisson search."""
    if not server:
        return []
    base, ceiling = server.baseline, server.batched_ceiling
    base_ips = base.images_per_s if base else None
    top_ips = ceiling.images_per_s if ceiling else None
    lines = ["## Server scenario (Triton, dynamic batching, loopback clients)", "",
             f"Command: `{server.command}`; {server.seconds} s per level after "
             f"{server.warmup_s} s of warm-up; batch-1 binary-tensor requests; dynamic batching up "
             f"to {server.max_batch_size}, queue delay {server.queue_delay_us} us.",
             "",
             "| concurrency | images/s | vs in-process b1 | vs batching ceiling | p50 ms | p90 ms | "
             "p99 ms | Triton p99 ms | mean batch | requests | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in server.rows:
        b = row.breakdown
        lines.append(
            f"| {row.concurrency} | {row.images_per_s:.1f} | {_ratio(row.images_per_s, base_ips)} | "
            f"{_ratio(row.images_per_s, top_ips)} | {_fmt(row.p50_ms)} | {_fmt(row.p90_ms)} | "
            f"{_fmt(row.p99_ms)} | {_fmt(b.triton_p99_ms if b else None)} | "
            f"{_fmt(b.mean_batch if b else None)} | {row.requests} | {row.errors}"
            + (f" ({row.first_error})" if row.first_error else "") + " |")
    if base and base_ips:
        lines += ["", f"In-process baseline in the same run: ort-cpu fp32 at batch 1, "
                      f"{base_ips:.1f} images/s (p50 {base.p50_ms:.2f} ms)."]
    if ceiling and base_ips:
        lines.append(f"Batching ceiling in the same run: ort-cpu fp32 at batch {ceiling.batch}, "
                     f"{ceiling.images_per_s:.1f} images/s ({ceiling.images_per_s / base_ips:.2f}x "
                     f"batch 1), the best in-process batched throughput: the most that batching "
                     f"requests together could give here.")
    best, budget = server.best, server.budget_ms
    if best:
        lines.append(f"Recommended setting: concurrency {best.concurrency} with dynamic batching up to "
                     f"{best.max_batch_size}: {best.images_per_s:.1f} images/s at p99 "
                     f"{best.p99_ms:.1f} ms" + (f", within the {budget:g} ms budget." if budget else "."))
    elif budget:
        lines.append(f"No concurrency kept p99 within the {budget:g} ms budget.")
    lines += breakdown_lines(server)
    lines += cpu_lines(server)
    lines += target_lines(server)
    lines += poisson_lines(server)
    stop = server.stop
    lines += ["", f"Server stopped by SIGTERM: exit code {stop.exit_code}, ports free again: "
                  f"{stop.ports_free}.", ""]
    return lines


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "—"


def breakdown_lines(server: ServerSection) -> list[str]:
    """Per-request means by stage, one column per load level (and the Poisson best)."""
    columns = [(f"c={row.concurrency}", row.breakdown) for row in server.rows if row.breakdown]
    search = server.poisson
    if search and search.best and search.best.breakdown:
        columns.append((f"poisson {search.best.target_per_s:g}/s", search.best.breakdown))
    if not columns:
        return []
    lines = ["", "### Where a request's time goes (mean ms per request, from the server's metrics)", "",
             "| stage | " + " | ".join(name for name, _ in columns) + " | measured as |",
             "|---|" + "---|" * len(columns) + "---|"]
    for index, (stage, _, meaning) in enumerate(columns[0][1].stages()):
        cells = [_fmt(b.stages()[index][1]) for _, b in columns]
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {meaning} |")
    lines.append("| **total** | " + " | ".join(f"**{_fmt(b.total_ms)}**" for _, b in columns)
                 + " | the clients' mean latency |")
    lines.append("| Triton request | " + " | ".join(_fmt(b.triton_request_ms) for _, b in columns)
                 + " | nv_inference_request_duration_us |")
    lines.append("| Triton p50 / p99 | " + " | ".join(
        f"{_fmt(b.triton_p50_ms)} / {_fmt(b.triton_p99_ms)}" for _, b in columns)
        + " | nv_inference_request_summary_us (Triton's sliding window, read at the end) |")
    return lines


def cpu_lines(server: ServerSection) -> list[str]:
    """CPU ms per request by process role, one column per load level."""
    rows = [r for r in server.rows if r.cpu_ms_per_request]
    if not rows:
        return []
    roles = list(rows[0].cpu_ms_per_request or {})
    lines = ["", "### CPU per request by process (ms; clients and server share the cores)", "",
             "| process | " + " | ".join(f"c={r.concurrency}" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for role in roles:
        lines.append(f"| {role} | " + " | ".join(_fmt((r.cpu_ms_per_request or {}).get(role))
                                                  for r in rows) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum((r.cpu_ms_per_request or {}).values()):.2f}**"
                                                for r in rows) + " |")
    lines.append("| the machine's CPU per request | " + " | ".join(
        _fmt(server.threads * r.seconds * 1e3 / r.requests if r.requests else None) for r in rows)
        + " |")
    return lines


def _outside_cpu_ms(row: ServerRow) -> float | None:
    """CPU ms per request of the processes that never run the model."""
    cpu = row.cpu_ms_per_request
    if not cpu:
        return None
    return sum(ms for role, ms in cpu.items() if role != MODEL_ROLE)


def target_lines(server: ServerSection) -> list[str]:
    """The targets: overhead at concurrency 1, share of the batching ceiling, batching gain."""
    base, ceiling = server.baseline, server.batched_ceiling
    lines: list[str] = [""]
    single = next((r for r in server.rows if r.concurrency == 1 and r.p50_ms), None)
    if single and base and base.p50_ms:
        delay_ms = server.queue_delay_us / 1000
        bound = base.p50_ms + delay_ms + OVERHEAD_BUDGET_MS
        gap = single.p50_ms - bound
        verdict = "met" if gap <= 0 else f"MISSED by {gap:.2f} ms"
        lines.append(f"**Overhead at concurrency 1**: p50 {single.p50_ms:.2f} ms against in-process "
                     f"{base.p50_ms:.2f} ms + queue delay {delay_ms:g} ms + {OVERHEAD_BUDGET_MS:g} ms "
                     f"= {bound:.2f} ms: **{verdict}**.")
        b = single.breakdown
        if b:
            shares = sorted(((ms, stage) for stage, ms, _ in b.stages() if ms and stage != "model"),
                            reverse=True)
            lines.append("Besides the model's own " + _fmt(b.model_ms) + " ms, the time goes to: "
                         + ", ".join(f"{stage} {ms:.2f} ms" for ms, stage in shares[:5]) + ".")
    ok = [r for r in server.rows if r.status == "ok"]
    if ok and ceiling and ceiling.images_per_s:
        top = max(ok, key=lambda r: r.images_per_s)
        share = top.images_per_s / ceiling.images_per_s
        lines.append(f"**Throughput**: {top.images_per_s:.1f} images/s at concurrency "
                     f"{top.concurrency} is {share:.2f}x the batching ceiling ({ceiling.images_per_s:.1f} "
                     f"at batch {ceiling.batch}); target >= {CEILING_SHARE:g}x: "
                     f"**{'met' if share >= CEILING_SHARE else 'MISSED'}**.")
        outside = _outside_cpu_ms(top)
        if outside is not None:
            model_ms = server.threads * 1e3 / ceiling.images_per_s
            bound = server.threads * 1e3 / (model_ms + outside)
            lines.append(f"On these {server.threads} shared cores the in-process model needs "
                         f"{model_ms:.2f} CPU ms per image at its best, and the processes that never "
                         f"run it (the clients, serve's fronts, Triton) took {outside:.2f} per "
                         f"request at concurrency {top.concurrency}: even a model as efficient as "
                         f"in-process would top out near {bound:.1f} images/s "
                         f"({bound / ceiling.images_per_s:.2f}x the ceiling) before the Python "
                         f"backend's own work around the runtime takes its share.")
        if base and base.images_per_s:
            gain = ceiling.images_per_s / base.images_per_s
            served = top.images_per_s / base.images_per_s
            where = ("batching pays here" if gain >= BATCHING_GAIN else
                     f"not reachable here: in-process batching itself gains only {gain:.2f}x")
            lines.append(f"Against in-process batch 1: {served:.2f}x (the {BATCHING_GAIN:g}x target "
                         f"is for machines where batching pays; {where}).")
    return lines if len(lines) > 1 else []


def poisson_lines(server: ServerSection) -> list[str]:
    search = server.poisson
    if not search:
        return []
    lines = ["", f"### Open loop: Poisson arrivals, p99 bound {search.p99_bound_ms:g} ms", "",
             f"{search.generator} schedules batch-1 requests on a Poisson process and counts each "
             f"request's latency from its scheduled send time; the search bisects the rate below "
             f"{search.ceiling_per_s:g} req/s (the best closed-loop images/s), {search.trial_seconds:g} s "
             f"per run (at least 100 requests).", "",
             "| target req/s | scheduled | completed | p50 ms | p90 ms | p99 ms | max ms | requests | "
             "errors | p99 within bound | LoadGen early stopping |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in search.trials:
        lines.append(f"| {t.target_per_s:g} | {t.scheduled_per_s:.1f} | {t.completed_per_s:.1f} | "
                     f"{t.p50_ms:.2f} | {t.p90_ms:.2f} | {t.p99_ms:.2f} | {t.max_ms:.2f} | {t.requests} | "
                     f"{t.errors}" + (f" ({t.first_error})" if t.first_error else "")
                     + f" | {'yes' if t.within_bound else 'no'} | "
                     f"{'met' if t.early_stopping_met else 'not met'} |")
    best = search.best
    if best:
        lines += ["", f"**Highest Poisson rate within p99 {search.p99_bound_ms:g} ms: {best.target_per_s:g} "
                      f"requests/s** (p50 {best.p50_ms:.2f} ms, p99 {best.p99_ms:.2f} ms, "
                      f"{best.errors} errors, {best.requests} requests)."]
        lines += capacity_check_lines(search)
    else:
        lines += ["", f"**No rate tried kept p99 within {search.p99_bound_ms:g} ms.**"]
    return lines


def capacity_check_lines(search: PoissonSearch) -> list[str]:
    """``--verify-capacity``'s runs: each at 90% of the capacity so far, a miss lowering it."""
    if not search.checks:
        return []
    fraction = f"{100 * search.VERIFY_FRACTION:.0f}%"
    lines = ["", f"Capacity check (`--verify-capacity`): Poisson arrivals at {fraction} of the "
                 f"capacity, {search.trial_seconds:g} s each; a run whose p99 misses lowers the "
                 f"capacity to its own rate (at most {search.MAX_CHECKS} runs).", "",
             "| capacity req/s | check req/s | p50 ms | p99 ms | requests | errors | held |",
             "|---|---|---|---|---|---|---|"]
    for capacity, check in search.check_capacities:
        over = check.p99_ms - search.p99_bound_ms
        held = "yes" if check.within_bound else (
            f"no: {check.errors} requests failed" if check.errors else
            f"no: p99 {over:.2f} ms ({100 * over / search.p99_bound_ms:.0f}%) over the bound")
        lines.append(f"| {capacity:g} | {check.target_per_s:g} | {check.p50_ms:.2f} | "
                     f"{check.p99_ms:.2f} | {check.requests} | {check.errors} | {held} |")
    lowered = (f", lowered from {search.found_per_s:g}" if search.capacity_per_s != search.found_per_s
               else "")
    lines += ["", f"**Capacity {search.capacity_per_s:g} requests/s{lowered}: "
                  f"{search.capacity_check}.**"]
    return lines


def plot(rows: list[LatencyRow], path: Path, title: str) -> None:
    """p50 bars with p90 whiskers per backend at batch 1; images/s against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = ok_rows(rows)
    multi = len({row.machine for row in good}) > 1
    label = ((lambda r: f"{_row_name(r)}\n{(r.machine or '')[:28]}") if multi else _row_name)
    batch1 = sorted((r for r in good if r.batch == 1), key=lambda r: r.p50_ms)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    if batch1:
        p50 = [r.p50_ms for r in batch1]
        whisker = [[0] * len(batch1), [r.p90_ms - r.p50_ms for r in batch1]]
        left.bar([label(r) for r in batch1], p50, yerr=whisker, capsize=4, color="tab:blue")
        left.tick_params(axis="x", rotation=30, labelsize=8)
    left.set_title("batch 1: p50 latency (whisker: p90)")
    left.set_ylabel("ms per batch")
    series: dict[str, list[tuple[int, float]]] = {}
    for row in good:
        series.setdefault(label(row).replace("\n", " "), []).append((row.batch, row.images_per_s))
    for name, points in sorted(series.items()):
        points.sort()
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    right.set_xscale("log", base=2)
    right.set_xlabel("batch size")
    right.set_ylabel("images / s")
    right.set_title("throughput against batch size")
    if series:
        right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_bench_outputs(doc: LatencyDoc, folder: Path, budget_ms: float | None) -> Recommendation:
    """latency.json, report.md and latency.png into ``folder``; returns the recommendation."""
    advice = recommend(doc.rows, budget_ms)
    doc.recommendation = advice
    doc.dump(folder / LATENCY)
    write_text_atomic(folder / REPORT, bench_markdown(doc, advice))
    plot(doc.rows, folder / LATENCY_PLOT, f"{doc.model.arch} — {doc.machine_label}")
    return advice


def record_bench(folder: Path, duration_s: float) -> None:
    """Put the bench files and the stage's duration into the bundle's manifest."""
    Bundle(folder).record_stage("bench", files=BENCH_FILES,
                                summary={"duration_s": round(duration_s, 3)})


def save_bench(doc: LatencyDoc, folder: Path, budget_ms: float | None, *,
               started: float) -> Recommendation:
    """The end of every bench (single-stream, server scenario, ``run``): latency.json,
    report.md and latency.png written, the stage recorded in the manifest with its duration
    since ``started`` (``time.perf_counter()``); returns the recommendation."""
    advice = write_bench_outputs(doc, folder, budget_ms)
    record_bench(folder, time.perf_counter() - started)
    return advice


def stale_parity_warnings(bundle: Bundle) -> list[str]:
    """bench's own check: does parity.json describe the models bench just timed?"""
    parity = read_parity(bundle)
    if parity is None:
        return [f"{bundle.root} has no parity.json: nothing timed here was verified; run "
                f"python -m pipeline verify {bundle.root}"]
    current = {entry.sha256 for entry in bundle.artifacts().values()}
    measured = {p.model_sha256 for p in [*parity.pairs, *parity.gates] if p.model_sha256}
    if measured - current:
        return [f"{bundle.root}/parity.json was made for models that have since changed; run "
                f"python -m pipeline verify {bundle.root} again"]
    return []


