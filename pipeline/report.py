"""JSON, Markdown and PNG from latency documents; merging documents from several machines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.bench import SCHEMA_VERSION, target_of, ok_rows, precision_label, recommend
from pipeline.bundle import save_atomic, write_json_atomic, write_text_atomic
from pipeline.errors import InputError


def machine_label(doc: dict[str, Any]) -> str:
    machine = doc.get("machine", {})
    gpu = machine.get("gpu")
    label = f"{machine.get('hostname', '?')}: {machine.get('cpu', '?')}"
    return f"{label} + {gpu['name']}" if gpu else label


def load_latency(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"latency file {str(path)!r} does not exist; make one with "
                         f"python -m pipeline bench BUNDLE")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != "pipeline.latency":
        raise InputError(f"{str(path)!r} is not a latency.json written by python -m pipeline bench")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"{str(path)!r} has schema_version {doc.get('schema_version')!r}; "
                         f"this pipeline reads {SCHEMA_VERSION}. Re-run bench")
    return doc


def labelled_rows(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row tagged with its machine, so rows from several machines can share a table."""
    rows = []
    for doc in docs:
        label = machine_label(doc)
        rows += [{**row, "machine": label, "arch": doc["model"]["arch"]} for row in doc["rows"]]
    return rows


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def rows_table(rows: list[dict[str, Any]], *, with_machine: bool) -> list[str]:
    head = ["machine"] if with_machine else []
    head += ["backend", "precision", "batch", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "mean ± std ms",
             "n", "ms/image", "images/s", "GFLOP/s", "cold create ms", "first infer ms", "verified",
             "provider"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["machine"]] if with_machine else []
        if row["status"] != "ok":
            cells += [row["backend"], precision_label(row), str(row["batch"]),
                      f"**{row['status']}**: {row['reason']}"]
            cells += [""] * (len(head) - len(cells))
        else:
            cells += [row["backend"], precision_label(row), str(row["batch"]), _fmt(row["p50_ms"]),
                      _fmt(row["p90_ms"]),
                      _fmt(row["p95_ms"]), _fmt(row["p99_ms"]) if row["p99_ms"] is not None else "omitted (n<600)",
                      f"{row['mean_ms']:.2f} ± {row['std_ms']:.2f}", str(row["n"]),
                      _fmt(row["ms_per_image"], ".3f"), _fmt(row["images_per_s"], ".1f"),
                      _fmt(row["gflops"], ".1f"), _fmt(row["cold_create_ms"], ".0f"),
                      _fmt(row["cold_first_infer_ms"], ".0f"), _verified(row), str(row["provider"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _verified(row: dict[str, Any]) -> str:
    text = row.get("verified") or "not verified"
    if row.get("top1_agreement") is not None:
        text += f" (agreement {100 * row['top1_agreement']:.1f}%"
        if row.get("top1_drop_points") is not None:
            text += f", top-1 {0.0 - row['top1_drop_points'] + 0.0:+.2f} pts"
        text += ")"
    return text


def accuracy_cost(choice: dict[str, Any]) -> str:
    if choice.get("top1_agreement") is None:
        return "fp32: no accuracy cost" if (choice.get("precision_requested") or "fp32") == "fp32" else ""
    cost = f"top-1 agreement with fp32 {100 * choice['top1_agreement']:.2f}%"
    if choice.get("top1_drop_points") is not None:
        cost += f", top-1 accuracy {0.0 - choice['top1_drop_points'] + 0.0:+.2f} points"
    return cost


def _named(row: dict[str, Any]) -> str:
    return f"{row['backend']} {precision_label(row)}"


def recommendation_lines(advice: dict[str, Any]) -> list[str]:
    lines = ["## Recommendation", ""]
    best = advice["fastest_batch1"]
    if best:
        where = f" on {best['machine']}" if best.get("machine") else ""
        lines.append(f"- Fastest verified model at batch 1: **{_named(best)}**{where} "
                     f"(p50 {best['p50_ms']:.2f} ms, p90 {best['p90_ms']:.2f} ms; {accuracy_cost(best)}).")
        fp32 = advice.get("fastest_fp32_batch1")
        if fp32 and fp32 != best:
            lines.append(f"- That is {advice['speedup_vs_fp32']:.2f}x the fastest fp32, "
                         f"{_named(fp32)} (p50 {fp32['p50_ms']:.2f} ms).")
    else:
        lines.append("- No verified backend produced numbers.")
    if advice.get("not_verified"):
        lines.append(f"- Not verified, so never recommended: {', '.join(advice['not_verified'])} "
                     f"(run `python -m pipeline verify` with evaluation images, then bench again).")
    if advice["budget_ms"] is not None:
        meets = advice["meets_budget"] or []
        names = ", ".join(f"{_named(m)} @ batch {m['batch']} ({m['p90_ms']:.2f} ms)"
                          + (f" [{m['machine']}]" if m.get("machine") else "") for m in meets)
        lines.append(f"- Meets the {advice['budget_ms']:g} ms budget at p90: {names or 'none'}.")
    crossover = advice["gpu_vs_cpu"]
    if isinstance(crossover, dict):
        at = advice["gpu_overtakes_cpu_at_batch"]
        ratios = ", ".join(f"batch {b}: {r}x" for b, r in crossover.items())
        lines.append(f"- GPU vs CPU throughput (best of each): {ratios}. "
                     + (f"The GPU overtakes the CPU at batch {at}." if at else
                        "The GPU did not overtake the CPU at the measured batch sizes."))
    else:
        lines.append(f"- GPU vs CPU: {crossover}.")
    return lines + [""]


def image_loop_lines(loops: list[dict[str, Any]]) -> list[str]:
    if not loops:
        return []
    lines = ["## Per-image loop over real files", "",
             "| backend | summary | decode p50 ms | infer p50 ms | sequential img/s | pipelined img/s |",
             "|---|---|---|---|---|---|"]
    for loop in loops:
        seq, pipe = loop["sequential"], loop["pipelined"]
        lines.append(f"| {loop['backend']} | `{loop['summary']}` | {_fmt((seq['decode'] or {}).get('p50_ms'))} | "
                     f"{_fmt((seq['infer'] or {}).get('p50_ms'))} | {_fmt(seq['images_per_s'], '.1f')} | "
                     f"{_fmt(pipe['images_per_s'], '.1f')} ({pipe['workers']} workers) |")
    return lines + [""]


def machine_lines(doc: dict[str, Any]) -> list[str]:
    machine, config = doc["machine"], doc["config"]
    gpu = machine.get("gpu")
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    flags = " ".join(f for f, present in (machine.get("cpu_flags") or {}).items() if present)
    return [f"- CPU: {machine['cpu']} ({machine['cpu_count']} logical cores; flags: {flags or 'none of note'})",
            f"- GPU: {gpu['name']}, driver {gpu['driver']}, CUDA {gpu['cuda_runtime']}" if gpu else "- GPU: none",
            f"- Threads for every CPU backend: {config['threads']}",
            f"- Protocol: warm-up >= {config['min_warmup_iterations']} iterations and >= "
            f"{config['warmup_s']} s; timed until >= {config['iterations']} iterations and >= "
            f"{config['seconds']} s; TF32 off on GPU",
            f"- Versions: {versions}", ""]


def bench_markdown(doc: dict[str, Any], advice: dict[str, Any]) -> str:
    model = doc["model"]
    lines = [f"# Latency: {model['arch']} at {model['input_size']} px", "",
             f"Command: `{doc.get('command', 'python -m pipeline bench')}`", "",
             f"Created {doc['created']}; {model['gmacs_per_image']:.3f} GMACs per image; "
             f"ONNX file {model['onnx_file']}.", ""]
    lines += machine_lines(doc)
    lines += recommendation_lines(advice)
    lines += ["## Results", ""] + rows_table(labelled_rows([doc]), with_machine=False) + [""]
    lines += image_loop_lines(doc.get("images", []))
    lines += server_lines(doc.get("server"))
    return "\n".join(lines)


def server_lines(server: dict[str, Any] | None) -> list[str]:
    """The server scenario: throughput and latency per concurrency, against single-stream."""
    if not server:
        return []
    base = server.get("baseline") or {}
    base_ips = base.get("images_per_s")
    lines = ["## Server scenario (Triton, dynamic batching, loopback clients)", "",
             f"Command: `{server.get('command', '')}`; {server.get('seconds', '?')} s per level after "
             f"{server.get('warmup_s', '?')} s of warm-up; batch-1 requests; dynamic batching up to "
             f"{server.get('max_batch_size', '?')}, queue delay {server.get('queue_delay_us', '?')} us.",
             "",
             "| concurrency | images/s | vs single-stream ORT b1 | p50 ms | p90 ms | p99 ms | requests | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for row in server.get("rows", []):
        ratio = f"{row['images_per_s'] / base_ips:.2f}x" if base_ips and row["images_per_s"] else "—"
        lines.append(f"| {row['concurrency']} | {row['images_per_s']:.1f} | {ratio} | "
                     f"{_fmt(row.get('p50_ms'))} | {_fmt(row.get('p90_ms'))} | {_fmt(row.get('p99_ms'))} | "
                     f"{row['requests']} | {row['errors']}" + (f" ({row['first_error']})" if row.get("first_error") else "")
                     + " |")
    if base_ips:
        lines += ["", f"Single-stream baseline in the same run: ort-cpu fp32 at batch 1, "
                      f"{base_ips:.1f} images/s (p50 {base['p50_ms']:.2f} ms)."]
    ceiling = server.get("batched_ceiling")
    if ceiling and base_ips:
        lines.append(f"ort-cpu fp32 at batch {ceiling['batch']} in the same run: "
                     f"{ceiling['images_per_s']:.1f} images/s ({ceiling['images_per_s'] / base_ips:.2f}x "
                     f"batch 1), the most that batching requests together could give here.")
    best = server.get("best")
    budget = server.get("budget_ms")
    if best:
        lines.append(f"Recommended setting: concurrency {best['concurrency']} with dynamic batching up to "
                     f"{best['max_batch_size']}: {best['images_per_s']:.1f} images/s at p99 "
                     f"{best['p99_ms']:.1f} ms" + (f", within the {budget:g} ms budget." if budget else "."))
    elif budget:
        lines.append(f"No concurrency kept p99 within the {budget:g} ms budget.")
    stop = server.get("stop") or {}
    lines += ["", f"Server stopped by SIGTERM: exit code {stop.get('exit_code')}, ports free again: "
                  f"{stop.get('ports_free')}.", ""]
    return lines


def compare_markdown(docs: list[dict[str, Any]], advice: dict[str, Any], command: str,
                     warnings: list[str] | None = None) -> str:
    lines = ["# Latency comparison across machines", "", f"Command: `{command}`", ""]
    lines += [f"> warning: {w}" for w in warnings or []] + ([""] if warnings else [])
    for doc in docs:
        lines.append(f"## {machine_label(doc)}")
        lines.append(f"Model {doc['model']['arch']} at {doc['model']['input_size']} px, created {doc['created']}")
        lines += [""] + machine_lines(doc)
    lines += recommendation_lines(advice)
    lines += ["## All rows", ""] + rows_table(labelled_rows(docs), with_machine=True) + [""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """p50 bars with p90 whiskers per backend at batch 1; images/s against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = ok_rows(rows)
    multi = len({row.get("machine") for row in good}) > 1
    label = ((lambda r: f"{_named(r)}\n{r['machine'][:28]}") if multi else _named)
    batch1 = sorted((r for r in good if r["batch"] == 1), key=lambda r: r["p50_ms"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    if batch1:
        p50 = [r["p50_ms"] for r in batch1]
        whisker = [[0] * len(batch1), [r["p90_ms"] - r["p50_ms"] for r in batch1]]
        left.bar([label(r) for r in batch1], p50, yerr=whisker, capsize=4, color="tab:blue")
        left.tick_params(axis="x", rotation=30, labelsize=8)
    left.set_title("batch 1: p50 latency (whisker: p90)")
    left.set_ylabel("ms per batch")
    series: dict[str, list[tuple[int, float]]] = {}
    for row in good:
        series.setdefault(label(row).replace("\n", " "), []).append((row["batch"], row["images_per_s"]))
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


def write_bench_outputs(doc: dict[str, Any], folder: Path, budget_ms: float | None) -> dict[str, Any]:
    """latency.json, report.md and latency.png into ``folder``; returns the recommendation."""
    from pipeline.bundle import LATENCY, LATENCY_PLOT, REPORT

    advice = recommend(doc["rows"], budget_ms)
    doc["recommendation"] = advice
    write_json_atomic(folder / LATENCY, doc)
    write_text_atomic(folder / REPORT, bench_markdown(doc, advice))
    plot(doc["rows"], folder / LATENCY_PLOT, f"{doc['model']['arch']} — {machine_label(doc)}")
    return advice


def record_bench(folder: Path, duration_s: float) -> None:
    """Put the bench files and the stage's duration into the bundle's manifest."""
    from pipeline.bundle import BENCH_FILES, Bundle

    bundle = Bundle(folder)

    def update(manifest: dict[str, Any]) -> None:
        manifest.setdefault("stages", {})["bench"] = {"duration_s": round(duration_s, 3)}
        for name in BENCH_FILES:
            if bundle.path(name).is_file():
                bundle.record_artifact(manifest, name, stage="bench")

    bundle.update_manifest(update)


def check_mergeable(docs: list[dict[str, Any]], paths: list[Path], force: bool) -> list[str]:
    """Latency files of different models are not one comparison; --force merges them anyway."""
    models = {(d["model"]["arch"], d["model"]["input_size"]) for d in docs}
    if len(models) <= 1:
        return []
    listing = "; ".join(f"{p}: {d['model']['arch']} at {d['model']['input_size']} px"
                        for p, d in zip(paths, docs))
    if not force:
        raise InputError(f"these latency files measured different models ({listing}); a comparison "
                         f"across machines needs the same arch and input size. Pass --force to "
                         f"merge them anyway")
    return [f"merged different models: {listing}"]


def stale_rows(doc: dict[str, Any], path: Path) -> list[str]:
    """Rows whose model file no longer matches the bundle the latency file sits in."""
    from pipeline.bundle import MANIFEST, Bundle

    folder = Path(path).parent
    if not (folder / MANIFEST).is_file():
        return []
    try:
        artifacts = Bundle(folder).read_manifest().get("artifacts", {})
    except InputError:
        return []
    current = {name: entry["sha256"] for name, entry in artifacts.items()}
    stale = sorted({f"{target_of(row)} ({row['model_file']})"
                    for row in doc["rows"] if row.get("model_file")
                    and current.get(row["model_file"]) != row.get("model_sha256")})
    return [f"{path}: {', '.join(stale)} measured a model file that has since changed or gone; "
            f"re-run bench"] if stale else []


def stale_parity_warnings(bundle: Any) -> list[str]:
    """bench's own check: does parity.json describe the models bench just timed?"""
    from pipeline.bench import read_parity

    parity = read_parity(bundle)
    if parity is None:
        return [f"{bundle.root} has no parity.json: nothing timed here was verified; run "
                f"python -m pipeline verify {bundle.root}"]
    artifacts = bundle.read_manifest().get("artifacts", {})
    current = {entry["sha256"] for entry in artifacts.values()}
    measured = {p.get("model_sha256") for p in parity.get("pairs", []) + parity.get("gates", [])
                if p.get("model_sha256")}
    if measured - current:
        return [f"{bundle.root}/parity.json was made for models that have since changed; run "
                f"python -m pipeline verify {bundle.root} again"]
    return []


def write_comparison(paths: list[Path], out: Path, budget_ms: float | None, command: str,
                     *, force: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Merge latency files into report.md/report.png; returns (advice, warnings)."""
    docs = [load_latency(path) for path in paths]
    warnings = check_mergeable(docs, paths, force)
    for doc, path in zip(docs, paths):
        warnings += stale_rows(doc, path)
    rows = labelled_rows(docs)
    advice = recommend(rows, budget_ms)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.md", compare_markdown(docs, advice, command, warnings))
    plot(rows, out / "report.png", "latency comparison")
    return advice, warnings
