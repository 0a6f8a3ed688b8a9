"""``report``: merge latency.json files from several machines into one comparison.

The tables, the recommendation lines and the plot are bench's own (``stages.bench.writeup``):
report imports bench, never the reverse.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.bundle import MANIFEST, Bundle, write_text_atomic
from pipeline.core.records import LatencyDoc, Recommendation
from pipeline.errors import InputError
from pipeline.stages.bench.writeup import (
    labelled_rows,
    machine_lines,
    plot,
    recommendation_lines,
    rows_table,
)
from pipeline.stages.recommend import recommend


def compare_markdown(docs: list[LatencyDoc], advice: Recommendation, command: str,
                     warnings: list[str] | None = None) -> str:
    lines = ["# Latency comparison across machines", "", f"Command: `{command}`", ""]
    lines += [f"> warning: {w}" for w in warnings or []] + ([""] if warnings else [])
    for doc in docs:
        lines.append(f"## {doc.machine_label}")
        lines.append(f"Model {doc.model['arch']} at {doc.model['input_size']} px, created {doc.created}")
        lines += [""] + machine_lines(doc)
    lines += recommendation_lines(advice)
    lines += ["## All rows", ""] + rows_table(labelled_rows(docs), with_machine=True) + [""]
    return "\n".join(lines)


def check_mergeable(docs: list[LatencyDoc], paths: list[Path], force: bool) -> list[str]:
    """Latency files of different models are not one comparison; --force merges them anyway."""
    models = {(d.model["arch"], d.model["input_size"]) for d in docs}
    if len(models) <= 1:
        return []
    listing = "; ".join(f"{p}: {d.model['arch']} at {d.model['input_size']} px"
                        for p, d in zip(paths, docs))
    if not force:
        raise InputError(f"these latency files measured different models ({listing}); a comparison "
                         f"across machines needs the same arch and input size. Pass --force to "
                         f"merge them anyway")
    return [f"merged different models: {listing}"]


def stale_rows(doc: LatencyDoc, path: Path) -> list[str]:
    """Rows whose model file no longer matches the bundle the latency file sits in."""
    folder = Path(path).parent
    if not (folder / MANIFEST).is_file():
        return []
    try:
        artifacts = Bundle(folder).artifacts()
    except InputError:
        return []
    current = {name: entry.sha256 for name, entry in artifacts.items()}
    stale = sorted({f"{row.target} ({row.model_file})"
                    for row in doc.rows if row.model_file
                    and current.get(row.model_file) != row.model_sha256})
    return [f"{path}: {', '.join(stale)} measured a model file that has since changed or gone; "
            f"re-run bench"] if stale else []


def write_comparison(paths: list[Path], out: Path, budget_ms: float | None, command: str,
                     *, force: bool = False) -> tuple[Recommendation, list[str]]:
    """Merge latency files into report.md/report.png; returns (advice, warnings)."""
    docs = [LatencyDoc.load(path) for path in paths]
    warnings = check_mergeable(docs, paths, force)
    for doc, path in zip(docs, paths):
        warnings += stale_rows(doc, path)
    rows = labelled_rows(docs)
    advice = recommend(rows, budget_ms)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.md", compare_markdown(docs, advice, command, warnings))
    plot(rows, out / "report.png", "latency comparison")
    return advice, warnings
