"""What a configuration costs, and how many replicas a load needs.

Pure arithmetic on latency.json records, shared by ``report`` (the cost columns, the cheapest
configuration within a p99 bound) and ``deploy kubernetes`` (the replica count), so that the
two can never disagree:

- cost per million images = price per hour / (images/s x 3600) x 10^6;
- capacity within a p99 bound: the Poisson search's (``bench --scenario server --arrival
  poisson``; lowered by any ``--verify-capacity`` check that missed) where a file has one
  whose bound is within the one asked for; otherwise each
  single-stream, sweep or closed-loop server row whose own p99 is within the bound (closed
  loop: no queueing from random arrivals, so an optimistic figure, and the table says so);
- replicas = ceil(R / (capacity x headroom)). The headroom (``options.HEADROOM``, 0.8) keeps each replica
  at 80% of the capacity measured: below the 90% ``bench --verify-capacity`` checks, so every
  replica runs at a load whose p99 was seen to hold, with room for a replica lost to a rolling
  update or a node drain while the autoscaler reacts.

Only rows whose parity held (fp32) or whose accuracy gate passed (reduced precision) are
ranked (``LatencyRow.recommendable``, the rule bench's recommendation applies); the others are
listed with the reason. A machine with no price is shown without cost.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from pipeline.core.records import LatencyDoc, Record
from pipeline.errors import InputError
from pipeline.options import HEADROOM
IMAGES, REQUESTS = "images/s", "requests/s"
_UNITS = {"images/s": IMAGES, "img/s": IMAGES, "images": IMAGES,
          "requests/s": REQUESTS, "req/s": REQUESTS, "requests": REQUESTS}
SERVED_BACKEND = "triton-ort-cpu"  # what bench --scenario server serves (ONNX Runtime, fp32)


# ----------------------------------------------------------------------------- inputs
@dataclass
class Rate(Record):
    """A target load: images/s, or requests/s of one image each (as the server scenario and
    Triton clients send them)."""

    value: float
    unit: str

    @classmethod
    def parse(cls, text: str) -> "Rate":
        """``400 images/s``, ``400img/s``, ``250 requests/s`` or ``250req/s``: the unit is
        required, so that a rate is never read in the wrong one."""
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*([A-Za-z/]+)?\s*", text or "")
        unit = _UNITS.get((found.group(2) or "").lower()) if found else None
        if not found or unit is None:
            raise InputError(f"--target-rate {text!r}: give a number and its unit, images/s or "
                             f"requests/s (one image per request), e.g. --target-rate "
                             f"'400 images/s'")
        value = float(found.group(1))
        if not value > 0:
            raise InputError(f"--target-rate {text!r} must be more than 0")
        return cls(value, unit)

    def __str__(self) -> str:
        return f"{self.value:g} {self.unit}"


def parse_price(text: str) -> tuple[str, float]:
    """``LABEL=USD_PER_HOUR`` (``--price c7i.large=0.0893``)."""
    label, sep, amount = (text or "").partition("=")
    if not sep or not label.strip():
        raise InputError(f"--price {text!r}: give LABEL=USD_PER_HOUR, e.g. --price "
                         f"c7i.large=0.0893 (LABEL is bench --machine's label)")
    return label.strip(), check_price(label.strip(), amount, f"--price {text!r}")


def check_price(label: str, amount: object, where: str) -> float:
    try:
        value = float(amount)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{where}: the price of {label!r} must be a number of US dollars per "
                         f"hour, not {amount!r}") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{where}: the price of {label!r} is {amount!r}; a price per hour must "
                         f"be 0 or more")
    return value


def read_prices(path: Path) -> dict[str, float]:
    """A TOML file of prices in US dollars per hour, by machine label::

        [prices]
        "c7i.large" = 0.0893
        "g6.xlarge" = 0.8048

    (a ``[prices]`` table, or the same keys at the top level)."""
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"--prices {str(path)!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, IsADirectoryError) as exc:
        raise InputError(f"--prices {str(path)!r} is not a TOML file ({exc}); write one "
                         f"'\"LABEL\" = USD_PER_HOUR' line per machine under [prices]") from None
    table = data.get("prices", data)
    if not isinstance(table, dict) or not table:
        raise InputError(f"--prices {str(path)!r} names no prices; write one "
                         f"'\"LABEL\" = USD_PER_HOUR' line per machine under [prices]")
    return {str(label): check_price(str(label), value, f"--prices {path}")
            for label, value in table.items()}


def gather_prices(given: list[str], path: Path | None, labels: list[str]) -> dict[str, float]:
    """--prices FILE, then each --price (which wins); a label no latency file has is exit 2."""
    prices = read_prices(path) if path else {}
    prices.update(parse_price(text) for text in given)
    unknown = sorted(set(prices) - set(labels))
    if unknown:
        raise InputError(f"no latency file is labelled {unknown[0]!r} (a price was given for it); "
                         f"the labels are: {', '.join(sorted(set(labels)))}. Label a machine "
                         f"with bench --machine LABEL")
    return prices


# ----------------------------------------------------------------------------- arithmetic
def cost_per_million(usd_per_hour: float, images_per_s: float) -> float:
    """US dollars per million images at ``images_per_s``."""
    return usd_per_hour / (images_per_s * 3600.0) * 1e6


def replicas_needed(rate_per_s: float, capacity_per_s: float, headroom: float = HEADROOM) -> int:
    """ceil(R / (capacity x headroom)), at least 1 (a tolerance of 1e-9 keeps 400 / 80.0
    from becoming 6 through rounding)."""
    return max(1, math.ceil(rate_per_s / (capacity_per_s * headroom) - 1e-9))


# ----------------------------------------------------------------------------- the table
@dataclass
class CostRow(Record):
    """One machine and configuration: its throughput, its cost, and what a load needs of it."""

    WRITE_NONE: ClassVar[bool] = True

    machine: str  # the label
    config: str  # how tables name it: "ort-cpu int8 batch 8", "triton-ort-cpu fp32 Poisson"
    backend: str
    precision: str
    batch: int  # images per call; 1 for the served configurations (one image per request)
    source: str  # single-stream | server closed loop | server Poisson
    verified: str
    ranked: bool
    reason: str | None  # why it is not ranked
    images_per_s: float  # its peak: the row's throughput, or the Poisson capacity
    p99_ms: float | None
    usd_per_hour: float | None
    per_million_peak: float | None
    capacity_per_s: float | None = None  # within the p99 bound
    capacity_basis: str | None = None  # where the capacity comes from, or why there is none
    capacity_check: str | None = None  # held at 90% | not confirmed (bench --verify-capacity)
    per_million_bound: float | None = None
    replicas: int | None = None
    fleet_usd_per_hour: float | None = None
    threads: int | None = None
    peak_rss_mib: float | None = None
    gpu: bool = False

    @property
    def name(self) -> str:
        return f"{self.config} on {self.machine}"


@dataclass
class CostTable(Record):
    """report's cost section: every row, and the two answers."""

    NESTED: ClassVar[dict[str, type[Record]]] = {"rows": CostRow, "cheapest": CostRow,
                                                 "fastest": CostRow, "target_rate": Rate}
    WRITE_NONE: ClassVar[bool] = True

    p99_bound_ms: float | None
    headroom: float
    target_rate: Rate | None
    prices: dict[str, float]
    rows: list[CostRow] = field(default_factory=list)
    cheapest: CostRow | None = None  # within the bound: the smallest fleet cost, or per million
    fastest: CostRow | None = None  # within the bound: the most images/s per replica
    notes: list[str] = field(default_factory=list)

    @property
    def scope(self) -> str:
        """What the answer ranks within: 'within p99 100 ms' or 'at peak throughput'."""
        return (f"within p99 {self.p99_bound_ms:g} ms" if self.p99_bound_ms is not None
                else "at peak throughput")

    def per_million(self, row: CostRow) -> float | None:
        """The cost per million images the answer ranks by: within the bound when one was
        given, else at peak throughput."""
        return row.per_million_bound if self.p99_bound_ms is not None else row.per_million_peak

    def speed(self, row: CostRow) -> float | None:
        """The images/s per replica the answer ranks by: the capacity within the bound when one
        was given, else the peak."""
        return row.capacity_per_s if self.p99_bound_ms is not None else row.images_per_s

    @property
    def unpriced(self) -> list[str]:
        return sorted({row.machine for row in self.rows} - set(self.prices))


def configurations(doc: LatencyDoc) -> list[CostRow]:
    """Each measured configuration of one latency file as a CostRow without costs."""
    label = doc.machine_label
    gpu = doc.machine.gpu is not None
    out: list[CostRow] = []
    for row in doc.rows:
        if not row.ok or not row.images_per_s:
            continue
        precision = row.precision_label
        out.append(CostRow(
            machine=label, config=f"{row.backend} {precision} batch {row.batch}",
            backend=row.backend, precision=row.requested, batch=row.batch, source="single-stream",
            verified=row.verified, ranked=row.recommendable,
            reason=None if row.recommendable else row.verified, images_per_s=row.images_per_s,
            p99_ms=row.p99_ms, usd_per_hour=None, per_million_peak=None, threads=row.threads,
            peak_rss_mib=row.peak_rss_mib, gpu=(row.device or "cpu") != "cpu"))
    server = doc.server
    if server is None:
        return out
    # the served file is the one the in-process ort-cpu fp32 batch-1 baseline of the same run
    # timed: what verify said of that row is what it said of the served model
    baseline = server.baseline
    verified = baseline.verified if baseline else "not verified"
    ranked = baseline.recommendable if baseline else True  # fp32 no verify has judged
    common = dict(machine=label, backend=SERVED_BACKEND, precision="fp32", batch=1,
                  verified=verified, ranked=ranked, reason=None if ranked else verified,
                  usd_per_hour=None, per_million_peak=None, threads=server.threads,
                  peak_rss_mib=baseline.peak_rss_mib if baseline else None, gpu=gpu)
    for level in server.rows:
        if level.status == "ok" and level.images_per_s:
            out.append(CostRow(config=f"{SERVED_BACKEND} fp32 concurrency {level.concurrency}",
                               source="server closed loop", images_per_s=level.images_per_s,
                               p99_ms=level.p99_ms, **common))
    search = server.poisson
    if search is not None and search.best is not None:
        capacity = search.capacity_per_s or search.best.target_per_s
        out.append(CostRow(config=f"{SERVED_BACKEND} fp32 Poisson", source="server Poisson",
                           images_per_s=capacity, p99_ms=(search.verification or search.best).p99_ms,
                           capacity_check=search.capacity_check, **common))
    return out


def _capacity(doc: LatencyDoc, row: CostRow, bound_ms: float) -> tuple[float | None, str]:
    """The capacity of ``row`` within ``bound_ms``, and where it comes from (or why none)."""
    search = doc.server.poisson if doc.server else None
    usable = search is not None and search.best is not None and search.p99_bound_ms <= bound_ms
    if usable:
        if row.source == "server Poisson":
            check = f"; {row.capacity_check}" if row.capacity_check else "; not re-checked"
            lowered = (f", lowered from {search.found_per_s:g} by --verify-capacity"
                       if search.capacity_per_s != search.found_per_s else "")
            return row.images_per_s, (f"Poisson search at bound {search.p99_bound_ms:g} ms"
                                      f"{lowered}{check}")
        return None, "this machine's Poisson search gives its capacity within the bound"
    if row.source == "server Poisson":  # a search at a looser bound than the one asked for
        return None, f"its search's bound {search.p99_bound_ms:g} ms is over {bound_ms:g} ms"
    if row.p99_ms is None:
        return None, "no p99 (fewer than 600 timed calls)"
    if row.p99_ms > bound_ms:
        return None, f"p99 {row.p99_ms:.1f} ms is over {bound_ms:g} ms"
    loop = "closed loop" if row.source == "single-stream" else row.source
    return row.images_per_s, f"{loop} p99 {row.p99_ms:.1f} ms (no Poisson search: optimistic)"


def cost_table(docs: list[LatencyDoc], prices: dict[str, float], *, bound_ms: float | None = None,
               rate: Rate | None = None, headroom: float = HEADROOM) -> CostTable:
    """Every configuration of every file with its costs; the cheapest and the fastest ranked
    configurations within the bound (at peak throughput when no bound is given)."""
    if not 0 < headroom <= 1:
        raise InputError(f"--headroom {headroom:g} must be in (0, 1]: the share of the measured "
                         f"capacity each replica is planned to carry")
    if rate is not None and bound_ms is None:
        raise InputError("--target-rate sizes a fleet that keeps its p99 within a bound: give "
                         "the bound with --p99-ms, e.g. --p99-ms 100")
    table = CostTable(p99_bound_ms=bound_ms, headroom=headroom, target_rate=rate,
                      prices=dict(prices))
    for doc in docs:
        for row in configurations(doc):
            price = prices.get(row.machine)
            if price is not None:
                row.usd_per_hour = price
                row.per_million_peak = cost_per_million(price, row.images_per_s)
            if bound_ms is not None:
                row.capacity_per_s, row.capacity_basis = _capacity(doc, row, bound_ms)
            if row.capacity_per_s and price is not None:
                row.per_million_bound = cost_per_million(price, row.capacity_per_s)
            if rate is not None and row.capacity_per_s:
                if rate.unit == REQUESTS and row.batch > 1:
                    row.capacity_basis += ("; not sized: it needs requests of "
                                           f"{row.batch} images, the target is one per request")
                else:
                    row.replicas = replicas_needed(rate.value, row.capacity_per_s, headroom)
                    if price is not None:
                        row.fleet_usd_per_hour = row.replicas * price
            table.rows.append(row)
    if rate is not None and not any(r.capacity_per_s for r in table.rows):
        raise InputError(f"--target-rate {rate}: no configuration in these files has a capacity "
                         f"within p99 {bound_ms:g} ms (no Poisson search at that bound, and no "
                         f"row's p99 within it); measure one with: python -m pipeline bench "
                         f"BUNDLE --scenario server --arrival poisson --p99-ms {bound_ms:g}")
    within = [r for r in table.rows if r.ranked and (bound_ms is None or r.capacity_per_s)]
    table.fastest = max(within, key=lambda r: table.speed(r) or 0.0, default=None)
    if rate is not None:
        priced = [r for r in within if r.fleet_usd_per_hour is not None]
        table.cheapest = min(priced, key=lambda r: (r.fleet_usd_per_hour, r.per_million_bound),
                             default=None)
    else:
        priced = [r for r in within if table.per_million(r) is not None]
        table.cheapest = min(priced, key=lambda r: table.per_million(r) or 0.0, default=None)
    if table.unpriced:
        table.notes.append(f"no price for {', '.join(table.unpriced)}: shown without cost "
                           f"(give --price LABEL=USD_PER_HOUR)")
    return table


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indexes of the points no other point beats on both axes (lower is better on both),
    in order of the first axis."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best = math.inf
    for index in order:
        if points[index][1] < best:
            front.append(index)
            best = points[index][1]
    return front
