"""``report``: merge latency.json files from several machines into one comparison, and, given
prices, what each configuration costs.

The tables, the recommendation lines and the latency plot are bench's own
(``stages.bench.writeup``): report imports bench, never the reverse. The cost arithmetic is
``core.capacity``'s, which ``deploy kubernetes`` sizes its replicas with too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.bundle import MANIFEST, Bundle, save_atomic, write_text_atomic
from pipeline.core.capacity import (
    CostRow,
    CostTable,
    Rate,
    cost_table,
    gather_prices,
    pareto_front,
)
from pipeline.core.records import LatencyDoc, Recommendation
from pipeline.errors import InputError
from pipeline.options import HEADROOM
from pipeline.stages.bench.writeup import (
    labelled_rows,
    machine_lines,
    plot,
    recommendation_lines,
    rows_table,
)
from pipeline.stages.recommend import recommend

COST_PLOT = "report-cost.png"
MARKERS = {"single-stream": "o", "server closed loop": "s", "server Poisson": "*"}


@dataclass
class Comparison:
    """What ``write_comparison`` made: the recommendation, the cost table (with prices or a
    bound), the warnings, and the files written."""

    advice: Recommendation
    costs: CostTable | None
    warnings: list[str]
    files: list[Path]


def _money(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else f"${value:{spec}}"


def _num(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def cost_lines(table: CostTable) -> list[str]:
    """report.md's cost section: the answer first, then every configuration."""
    bound = table.p99_bound_ms
    lines = ["## Cost", ""]
    prices = ", ".join(f"{label} ${usd:g}/h" for label, usd in sorted(table.prices.items()))
    lines.append(f"Prices (US dollars per hour): {prices or 'none given'}. Cost per million images "
                 f"= price / (images/s x 3600) x 10^6.")
    if bound is not None:
        lines.append(f"Within p99 {bound:g} ms: the Poisson search's capacity where a file has "
                     f"one at that bound or tighter, otherwise each row whose own p99 is within it "
                     f"(closed loop, optimistic: no queueing from random arrivals).")
    if table.target_rate is not None:
        lines.append(f"Target {table.target_rate}: replicas = ceil(rate / (capacity x "
                     f"{table.headroom:g})), each replica planned at {100 * table.headroom:.0f}% of "
                     f"its measured capacity.")
    lines.append("")
    where = table.scope
    cheap, fast = table.cheapest, table.fastest
    if cheap is not None:
        if table.target_rate is not None:
            lines.append(f"- **Cheapest {where} for {table.target_rate}: {cheap.name}**: "
                         f"{cheap.replicas} replica{'s' if cheap.replicas != 1 else ''}, "
                         f"{_money(cheap.fleet_usd_per_hour, '.3f')}/h, "
                         f"{_money(cheap.per_million_bound)} per million images.")
        else:
            per_million = table.per_million(cheap)
            lines.append(f"- **Cheapest {where}: {cheap.name}**: {_money(per_million)} per "
                         f"million images.")
    else:
        lines.append(f"- No priced, verified configuration {where}.")
    if fast is not None:
        speed = table.speed(fast)
        extra = ""
        if table.target_rate is not None and fast.replicas is not None:
            extra = (f"; {fast.replicas} replica{'s' if fast.replicas != 1 else ''}, "
                     f"{_money(fast.fleet_usd_per_hour, '.3f')}/h")
        lines.append(f"- Fastest {where}: {fast.name}, {speed:.1f} images/s per replica"
                     f"{extra}" + ("" if fast is cheap or cheap is None else
                                   f" ({_cost_ratio(fast, cheap, table)})") + ".")
    lines += [f"- Note: {note}" for note in table.notes]
    skipped = sorted({f"{r.name}: {r.reason}" for r in table.rows if not r.ranked})
    if skipped:
        lines += ["", "Not ranked (only configurations whose parity held or whose accuracy gate "
                      "passed are):", ""] + [f"- {line}" for line in skipped]
    lines += ["", f"![cost per million images against p99 latency]({COST_PLOT})", ""]
    head = ["machine", "configuration", "verified", "images/s", "p99 ms", "$/h", "$/M at peak"]
    if bound is not None:
        head += [f"capacity within {bound:g} ms", "basis", "$/M within bound"]
    if table.target_rate is not None:
        head += ["replicas", "fleet $/h"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(table.rows, key=lambda r: (r.machine, r.source, r.config)):
        cells = [row.machine, row.config, row.verified, _num(row.images_per_s),
                 _num(row.p99_ms, ".2f"), _money(row.usd_per_hour, "g"),
                 _money(row.per_million_peak)]
        if bound is not None:
            cells += [_num(row.capacity_per_s), row.capacity_basis or "", _money(row.per_million_bound)]
        if table.target_rate is not None:
            cells += ["—" if row.replicas is None else str(row.replicas),
                      _money(row.fleet_usd_per_hour, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _cost_ratio(fast: CostRow, cheap: CostRow, table: CostTable) -> str:
    if table.target_rate is not None and fast.fleet_usd_per_hour and cheap.fleet_usd_per_hour:
        return f"{fast.fleet_usd_per_hour / cheap.fleet_usd_per_hour:.1f}x the cheapest fleet's cost"
    mine, theirs = table.per_million(fast), table.per_million(cheap)
    if mine and theirs:
        return f"{mine / theirs:.1f}x the cheapest's cost per million images"
    return "no price"


def cost_plot(table: CostTable, path: Path) -> None:
    """Cost per million images (at each configuration's own throughput) against its p99, one
    point per machine and verified configuration; the Pareto front joined, the bound drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in table.rows if r.ranked and r.per_million_peak and r.p99_ms]
    fig, axes = plt.subplots(figsize=(9, 6))
    machines = sorted({r.machine for r in shown})
    for index, machine in enumerate(machines):  # colour: the machine; shape: how it was measured
        for source, marker in MARKERS.items():
            mine = [r for r in shown if r.machine == machine and r.source == source]
            if mine:
                axes.scatter([r.p99_ms for r in mine], [r.per_million_peak for r in mine],
                             s=90 if marker == "*" else 36, marker=marker, color=f"C{index}",
                             zorder=3)
        axes.scatter([], [], s=36, color=f"C{index}", label=machine)
    for source, marker in MARKERS.items():
        if any(r.source == source for r in shown):
            axes.scatter([], [], s=36, marker=marker, color="grey", label=source)
    front = [shown[i] for i in pareto_front([(r.p99_ms, r.per_million_peak) for r in shown])]
    if front:
        axes.step([r.p99_ms for r in front], [r.per_million_peak for r in front], where="post",
                  color="black", linewidth=1.2, zorder=2, label="Pareto front")
        axes.scatter([r.p99_ms for r in front], [r.per_million_peak for r in front], s=120,
                     facecolors="none", edgecolors="black", zorder=4)
        for row in front:
            axes.annotate(row.config, (row.p99_ms, row.per_million_peak), fontsize=7,
                          xytext=(5, 4), textcoords="offset points")
    if table.p99_bound_ms is not None:
        axes.axvline(table.p99_bound_ms, color="tab:red", linestyle="--",
                     label=f"p99 bound {table.p99_bound_ms:g} ms")
    if shown:
        from matplotlib.ticker import FuncFormatter

        plain = FuncFormatter(lambda value, _: f"{value:g}")
        axes.set_xscale("log")
        axes.set_yscale("log")
        for axis in (axes.xaxis, axes.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(plain)
    else:
        axes.text(0.5, 0.5, "no priced, verified configuration with a p99", ha="center",
                  transform=axes.transAxes)
    axes.set_xlabel("p99 latency (ms)")
    axes.set_ylabel("cost per million images (US dollars)")
    axes.set_title("cost against latency: lower left is better")
    axes.grid(True, which="both", alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    fig.tight_layout()
    save_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def compare_markdown(docs: list[LatencyDoc], advice: Recommendation, command: str,
                     warnings: list[str] | None = None, costs: CostTable | None = None) -> str:
    lines = ["# Latency comparison across machines", "", f"Command: `{command}`", ""]
    lines += [f"> warning: {w}" for w in warnings or []] + ([""] if warnings else [])
    for doc in docs:
        lines.append(f"## {doc.machine_label}")
        lines.append(f"Model {doc.model.arch} at {doc.model.input_size} px, created {doc.created}")
        lines += [""] + machine_lines(doc)
    lines += recommendation_lines(advice)
    if costs is not None:
        lines += cost_lines(costs)
    lines += ["## All rows", ""] + rows_table(labelled_rows(docs), with_machine=True) + [""]
    return "\n".join(lines)


def check_mergeable(docs: list[LatencyDoc], paths: list[Path], force: bool) -> list[str]:
    """Latency files of different models are not one comparison; --force merges them anyway."""
    models = {(d.model.arch, d.model.input_size) for d in docs}
    if len(models) <= 1:
        return []
    listing = "; ".join(f"{p}: {d.model.arch} at {d.model.input_size} px"
                        for p, d in zip(paths, docs))
    if not force:
        raise InputError(f"these latency files measured different models ({listing}); a comparison "
                         f"across machines needs the same arch and input size. Pass --force to "
                         f"merge them anyway")
    return [f"merged different models: {listing}"]


def check_labels(docs: list[LatencyDoc], paths: list[Path], force: bool) -> list[str]:
    """Rows are grouped (and priced) by machine label: files under one label must come from
    one kind of machine (CPU model, flags, cores, GPU); --force merges them anyway."""
    warnings = []
    first: dict[str, tuple[Path, LatencyDoc]] = {}
    for path, doc in zip(paths, docs):
        label = doc.machine_label
        if label not in first:
            first[label] = (path, doc)
            continue
        other_path, other = first[label]
        if doc.machine.same_hardware(other.machine):
            continue
        clash = (f"{other_path} ({other.machine.description}) and {path} "
                 f"({doc.machine.description}) are both labelled {label!r}")
        if not force:
            raise InputError(f"{clash}, but they are different machines; relabel one with bench "
                             f"--machine LABEL, or pass --force to group them anyway")
        warnings.append(f"grouped different machines under one label: {clash}")
    return warnings


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


def write_comparison(paths: list[Path], out: Path, budget_ms: float | None, command: str, *,
                     force: bool = False, prices: list[str] | None = None,
                     prices_file: Path | None = None, p99_ms: float | None = None,
                     target_rate: Rate | None = None, headroom: float = HEADROOM) -> Comparison:
    """Merge latency files into report.md and report.png; with prices (``LABEL=USD`` strings,
    a TOML file) or a p99 bound, the cost section and report-cost.png too. Everything is
    checked before a file is written."""
    docs = [LatencyDoc.load(path) for path in paths]
    warnings = check_mergeable(docs, paths, force) + check_labels(docs, paths, force)
    for doc, path in zip(docs, paths):
        warnings += stale_rows(doc, path)
    price_table = (gather_prices(prices or [], prices_file, [d.machine_label for d in docs])
                   if prices or prices_file else {})
    costs = None
    if price_table or prices_file or p99_ms is not None or target_rate is not None:
        costs = cost_table(docs, price_table, bound_ms=p99_ms, rate=target_rate,
                           headroom=headroom)
    rows = labelled_rows(docs)
    advice = recommend(rows, budget_ms)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.md", out / "report.png"]
    plot(rows, out / "report.png", "latency comparison")
    if costs is not None:
        cost_plot(costs, out / COST_PLOT)
        files.append(out / COST_PLOT)
    write_text_atomic(out / "report.md", compare_markdown(docs, advice, command, warnings, costs))
    return Comparison(advice, costs, warnings, files)
