"""Choosing a device by cost (issue 27): report's machine labels and grouping, prices from the
command line and from a TOML file, the cost and replica arithmetic recomputed independently
from the rows, the ranking (gated configurations only; a machine with no price shown without
cost), the Poisson capacity preferred where a file has one, the cost plot, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.core.capacity import Rate, pareto_front, replicas_needed
from pipeline.core.records import (
    BenchConfig,
    BenchedModel,
    GpuFacts,
    LatencyDoc,
    LatencyRow,
    Machine,
    PoissonSearch,
    PoissonTrial,
    ServerRow,
    ServerSection,
    ServerStop,
)
from pipeline.errors import InputError
from tests.conftest import run_cli

def cpu_machine() -> Machine:
    return Machine(hostname="cpu-host", cpu="AMD EPYC", cpu_flags={"avx2": True}, cpu_count=2,
                   label="c7i.large")


def gpu_machine() -> Machine:
    return Machine(hostname="gpu-host", cpu="Intel Xeon", cpu_flags={"avx512f": True},
                   cpu_count=16, gpu=GpuFacts(name="NVIDIA H200"), label="h200")


def row(backend: str, precision: str, batch: int, per_s: float, p99: float | None,
        verified: str, device: str = "cpu") -> LatencyRow:
    per_call = 1000 * batch / per_s
    return LatencyRow(backend, batch, precision=precision, precision_requested=precision,
                      device=device, n=600, mean_ms=per_call, std_ms=0.1, p50_ms=per_call,
                      p90_ms=per_call, p95_ms=per_call, p99_ms=p99, ms_per_image=per_call / batch,
                      images_per_s=per_s, threads=2, verified=verified, peak_rss_mib=300.0)


def doc(machine: Machine, rows: list[LatencyRow], server: ServerSection | None = None) -> LatencyDoc:
    return LatencyDoc(model=BenchedModel(arch="resnet18", input_size=224),
                      config=BenchConfig(threads=2, min_warmup_iterations=10),
                      machine=machine, rows=rows, created="2026-12-07T00:00:00", server=server)


def cpu_doc() -> LatencyDoc:
    return doc(cpu_machine(), [row("ort-cpu", "fp32", 1, 150.0, 8.0, "parity passed"),
                     row("ort-cpu", "int8", 1, 300.0, 5.0, "gate passed"),
                     row("ort-cpu", "int8", 4, 420.0, 14.0, "gate passed"),
                     row("openvino-cpu", "int8", 1, 500.0, 4.0, "gate failed")])


def gpu_doc() -> LatencyDoc:
    return doc(gpu_machine(), [row("ort-cuda", "fp32", 1, 2000.0, 1.5, "parity passed", "cuda"),
                     row("ort-cuda", "fp32", 8, 8000.0, 3.0, "parity passed", "cuda"),
                     row("ort-cuda", "fp16", 8, 12000.0, 2.0, "not verified", "cuda")])


@pytest.fixture()
def two_files(tmp_path: Path) -> tuple[Path, Path]:
    cpu, gpu = tmp_path / "cpu.json", tmp_path / "gpu.json"
    cpu_doc().dump(cpu)
    gpu_doc().dump(gpu)
    return cpu, gpu


def report_json(*args) -> dict:
    result = run_cli("report", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def per_million(usd_per_hour: float, per_s: float) -> float:
    """Written out again here, not imported: price / (images per hour) x 10^6."""
    return usd_per_hour * 1_000_000 / (per_s * 60 * 60)


def test_costs_are_recomputed_exactly_and_the_cheapest_is_not_the_fastest(two_files, tmp_path):
    cpu, gpu = two_files
    data = report_json(cpu, gpu, "--out", tmp_path / "cmp", "--price", "c7i.large=0.10",
                       "--price", "h200=4.00", "--p99-ms", "10", "--target-rate", "1000 images/s")
    costs = data["costs"]
    rows = {(r["machine"], r["config"]): r for r in costs["rows"]}
    prices = {"c7i.large": 0.10, "h200": 4.00}
    for (machine, _), r in rows.items():
        assert r["per_million_peak"] == pytest.approx(per_million(prices[machine], r["images_per_s"]),
                                                      rel=1e-12)
        if r["p99_ms"] is not None and r["p99_ms"] <= 10:
            assert r["capacity_per_s"] == r["images_per_s"]
            assert r["per_million_bound"] == pytest.approx(
                per_million(prices[machine], r["images_per_s"]), rel=1e-12)
            needed = math.ceil(1000 / (r["images_per_s"] * 0.8))
            assert r["replicas"] == needed
            assert r["fleet_usd_per_hour"] == pytest.approx(needed * prices[machine], rel=1e-12)
        else:  # the int8 batch-4 row's p99 14 ms is over the bound
            assert r["capacity_per_s"] is None and r["replicas"] is None
    int8 = rows[("c7i.large", "ort-cpu int8 batch 1")]
    assert int8["replicas"] == 5 and int8["fleet_usd_per_hour"] == pytest.approx(0.5)
    # the GPU at batch 8 is the fastest, and 8x the fleet cost of five CPU boxes
    assert costs["fastest"]["config"] == "ort-cuda fp32 batch 8"
    assert costs["cheapest"]["config"] == "ort-cpu int8 batch 1"
    assert costs["cheapest"]["machine"] == "c7i.large"
    # ungated rows are listed, never ranked, with the reason
    assert not rows[("c7i.large", "openvino-cpu int8 batch 1")]["ranked"]
    assert rows[("c7i.large", "openvino-cpu int8 batch 1")]["reason"] == "gate failed"
    assert not rows[("h200", "ort-cuda fp16 batch 8")]["ranked"]
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "**Cheapest within p99 10 ms for 1000 images/s: ort-cpu int8 batch 1 on c7i.large**" in text
    assert "openvino-cpu int8 batch 1 on c7i.large: gate failed" in text
    assert "![cost per million images against p99 latency](report-cost.png)" in text


def test_without_a_bound_the_cheapest_is_per_million_at_peak(two_files, tmp_path):
    cpu, gpu = two_files
    costs = report_json(cpu, gpu, "--out", tmp_path, "--price", "c7i.large=0.10",
                        "--price", "h200=1.00")["costs"]
    ranked = [r for r in costs["rows"] if r["ranked"]]
    cheapest = min(ranked, key=lambda r: per_million({"c7i.large": 0.10, "h200": 1.00}[r["machine"]],
                                                     r["images_per_s"]))
    assert costs["cheapest"]["config"] == cheapest["config"] == "ort-cuda fp32 batch 8"
    assert costs["p99_bound_ms"] is None and costs["target_rate"] is None


def test_prices_from_a_toml_file_and_a_machine_without_a_price(two_files, tmp_path):
    cpu, gpu = two_files
    prices = tmp_path / "prices.toml"
    prices.write_text('[prices]\n"c7i.large" = 0.10\n')
    result = run_cli("report", cpu, gpu, "--out", tmp_path / "cmp", "--prices", prices,
                     "--p99-ms", "10")
    assert result.exit_code == 0, result.output
    assert "cheapest within p99 10 ms: ort-cpu int8 batch 1 on c7i.large" in result.stdout
    assert "no price for h200: shown without cost" in result.stdout
    text = (tmp_path / "cmp" / "report.md").read_text()
    gpu_line = next(line for line in text.splitlines() if "| h200 | ort-cuda fp32 batch 8 |" in line)
    assert "| — |" in gpu_line and "8000.0" in gpu_line  # its numbers, no cost
    # --price overrides the file
    data = report_json(cpu, gpu, "--out", tmp_path / "cmp2", "--prices", prices,
                       "--price", "c7i.large=0.20")
    assert data["costs"]["prices"] == {"c7i.large": 0.20}


def test_a_poisson_capacity_is_used_where_a_file_has_one(tmp_path):
    trial = PoissonTrial(target_per_s=90.0, scheduled_per_s=90.1, completed_per_s=90.0,
                         requests=900, errors=0, mean_ms=20.0, p50_ms=18.0, p90_ms=40.0,
                         p99_ms=80.0, max_ms=95.0, within_bound=True, early_stopping_met=True,
                         seconds=10.0)
    check = PoissonTrial(**{**trial.to_dict(), "target_per_s": 81.0, "p99_ms": 60.0})
    search = PoissonSearch(p99_bound_ms=100.0, generator="mlcommons-loadgen", ceiling_per_s=150.0,
                           trial_seconds=10.0, trials=[trial], best=trial, checks=[check])
    baseline = row("ort-cpu", "fp32", 1, 150.0, 8.0, "parity passed")
    level = ServerRow(scenario="server", backend="triton-ort-cpu", batch=1, concurrency=4,
                      requests=1000, errors=0, first_error=None, seconds=10.0, images_per_s=140.0,
                      status="ok", p99_ms=45.0)
    server = ServerSection(scenario="server", rows=[level], baseline=baseline,
                           batched_ceiling=None, stop=ServerStop(), budget_ms=None, best=level, seconds=10.0,
                           warmup_s=2.0, max_batch_size=32, queue_delay_us=0, threads=2,
                           command="bench", created="2026-12-07", poisson=search)
    doc(cpu_machine(), [baseline], server).dump(tmp_path / "latency.json")
    data = report_json(tmp_path / "latency.json", "--out", tmp_path, "--price", "c7i.large=0.10",
                       "--p99-ms", "100", "--target-rate", "200 requests/s")
    rows = {r["config"]: r for r in data["costs"]["rows"]}
    poisson = rows["triton-ort-cpu fp32 Poisson"]
    assert poisson["capacity_per_s"] == 90.0 and poisson["capacity_check"] == "held at 90%"
    assert poisson["replicas"] == math.ceil(200 / (90.0 * 0.8)) == 3
    assert "Poisson search" in poisson["capacity_basis"]
    # the closed-loop rows of a machine with a Poisson search are not its capacity
    assert rows["ort-cpu fp32 batch 1"]["capacity_per_s"] is None
    assert rows["triton-ort-cpu fp32 concurrency 4"]["capacity_per_s"] is None
    assert data["costs"]["cheapest"]["config"] == "triton-ort-cpu fp32 Poisson"
    # a search at a looser bound than the one asked for does not count
    loose = run_cli("report", tmp_path / "latency.json", "--out", tmp_path, "--p99-ms", "50",
                    "--target-rate", "200 requests/s")
    assert loose.exit_code == 0  # the single-stream row's p99 8 ms is within 50 ms
    strict = run_cli("report", tmp_path / "latency.json", "--out", tmp_path, "--p99-ms", "5",
                     "--target-rate", "200 requests/s")
    assert strict.exit_code == 2 and "no configuration in these files has a capacity" in strict.stderr


def test_requests_per_second_do_not_size_batched_rows(two_files, tmp_path):
    cpu, _ = two_files
    rows = {r["config"]: r for r in report_json(
        cpu, "--out", tmp_path, "--p99-ms", "20", "--target-rate", "100 req/s")["costs"]["rows"]}
    assert rows["ort-cpu int8 batch 1"]["replicas"] == 1
    assert rows["ort-cpu int8 batch 4"]["replicas"] is None
    assert "requests of 4 images" in rows["ort-cpu int8 batch 4"]["capacity_basis"]


def test_labels_group_rows_and_two_machines_under_one_label_need_force(two_files, tmp_path):
    cpu, gpu = two_files
    same = cpu_doc()
    same.rows = same.rows[:1]
    same.dump(tmp_path / "cpu-again.json")  # one machine benched twice: one group
    result = run_cli("report", cpu, tmp_path / "cpu-again.json", gpu, "--out", tmp_path / "cmp")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "| c7i.large | ort-cpu |" in text and "| h200 | ort-cuda |" in text
    clash = gpu_doc()
    clash.machine.label = "c7i.large"
    clash.dump(tmp_path / "clash.json")
    refused = run_cli("report", cpu, tmp_path / "clash.json", "--out", tmp_path / "cmp")
    assert refused.exit_code == 2
    assert "are both labelled 'c7i.large'" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.output
    forced = run_cli("report", cpu, tmp_path / "clash.json", "--out", tmp_path / "cmp", "--force")
    assert forced.exit_code == 0 and "grouped different machines under one label" in forced.stderr


def test_a_file_without_a_label_reads_as_its_hostname(tmp_path):
    data = cpu_doc().to_dict()
    del data["machine"]["label"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert LatencyDoc.load(tmp_path / "old.json").machine_label == "cpu-host"


@pytest.mark.parametrize("args, message", [
    (["--price", "m5.large=0.1"], "no latency file is labelled 'm5.large'"),
    (["--price", "c7i.large=-0.1"], "the price of 'c7i.large' is '-0.1'"),
    (["--price", "c7i.large"], "give LABEL=USD_PER_HOUR"),
    (["--price", "c7i.large=cheap"], "must be a number of US dollars per hour"),
    (["--p99-ms", "1", "--target-rate", "400 images/s"], "no configuration in these files has a "
                                                         "capacity within p99 1 ms"),
    (["--target-rate", "400 images/s"], "give the bound with --p99-ms"),
    (["--p99-ms", "10", "--target-rate", "400"], "give a number and its unit"),
    (["--p99-ms", "10", "--target-rate", "0 images/s"], "must be more than 0"),
    (["--prices", "missing.toml"], "does not exist"),
    (["--headroom", "1.5", "--p99-ms", "10"], "--headroom 1.5 must be in (0, 1]"),
])
def test_bad_input_is_exit_2_with_a_message(two_files, tmp_path, args, message):
    cpu, gpu = two_files
    result = run_cli("report", cpu, gpu, "--out", tmp_path / "cmp", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "cmp" / "report.md").exists()  # checked before anything is written


def test_a_bad_prices_file_is_exit_2(two_files, tmp_path):
    cpu, _ = two_files
    bad = tmp_path / "bad.toml"
    bad.write_text("c7i.large = = 1\n")
    result = run_cli("report", cpu, "--out", tmp_path, "--prices", bad)
    assert result.exit_code == 2 and "is not a TOML file" in result.stderr
    bad.write_text('[prices]\n"c7i.large" = -1\n')
    result = run_cli("report", cpu, "--out", tmp_path, "--prices", bad)
    assert result.exit_code == 2 and "must be 0 or more" in result.stderr


def test_the_cost_plot_is_written_with_its_pareto_front(two_files, tmp_path):
    cpu, gpu = two_files
    result = run_cli("report", cpu, gpu, "--out", tmp_path, "--price", "c7i.large=0.10",
                     "--price", "h200=4.00", "--p99-ms", "10")
    assert result.exit_code == 0, result.output
    image = tmp_path / "report-cost.png"
    assert image.stat().st_size > 10_000
    from PIL import Image

    assert Image.open(image).size[0] >= 900
    # the front among the plotted points: lower p99 and lower cost both win
    points = [(1.5, 0.555), (3.0, 0.139), (8.0, 0.185), (5.0, 0.0926), (14.0, 0.066)]
    assert pareto_front(points) == [0, 1, 3, 4]


def test_the_arithmetic_helpers():
    assert replicas_needed(400, 100, 0.8) == 5  # 400 / 80 is exactly 5, not 6
    assert replicas_needed(401, 100, 0.8) == 6
    assert replicas_needed(1, 1000) == 1
    assert Rate.parse("400 images/s") == Rate(400.0, "images/s")
    assert Rate.parse("2.5e2req/s") == Rate(250.0, "requests/s")
    with pytest.raises(InputError):
        Rate.parse("400 per second")


def test_a_failed_capacity_check_lowers_the_capacity():
    def trial(rate: float, held: bool) -> PoissonTrial:
        return PoissonTrial(target_per_s=rate, scheduled_per_s=rate, completed_per_s=rate,
                            requests=200, errors=0, mean_ms=20.0, p50_ms=18.0, p90_ms=40.0,
                            p99_ms=90.0 if held else 110.0, max_ms=120.0, within_bound=held,
                            early_stopping_met=False, seconds=10.0)
    found = trial(21.0, True)
    search = PoissonSearch(p99_bound_ms=100.0, generator="g", ceiling_per_s=40.0,
                           trial_seconds=10.0, trials=[found], best=found)
    assert search.capacity_per_s == 21.0 and search.capacity_check is None
    search.checks = [trial(18.9, False)]  # 90% of 21 missed: the capacity drops to 18.9
    assert search.capacity_per_s == 18.9 and search.capacity_check == "not confirmed"
    search.checks.append(trial(17.01, True))  # 90% of 18.9 held
    assert search.capacity_per_s == 18.9 and search.capacity_check == "held at 90%"
    assert search.found_per_s == 21.0


def test_readmes_worked_example_runs_on_the_committed_files(tmp_path):
    """README's two report commands, on benchmarks/results/cost/, give the answers it quotes."""
    cost = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cost"
    files = [cost / "zen4-2vcpu.json", cost / "zen4-1vcpu.json"]
    peak = report_json(*files, "--prices", cost / "prices.toml", "--out", tmp_path / "peak")["costs"]
    assert (peak["cheapest"]["config"], peak["cheapest"]["machine"]) == (
        "openvino-cpu int8 batch 8", "zen4-1vcpu")
    served = report_json(*files, "--prices", cost / "prices.toml", "--p99-ms", "50",
                         "--target-rate", "2000 images/s", "--out", tmp_path / "served")["costs"]
    cheap, fast = served["cheapest"], served["fastest"]
    assert (cheap["machine"], cheap["replicas"], round(cheap["fleet_usd_per_hour"], 3)) == (
        "zen4-1vcpu", 15, 0.769)
    assert (fast["machine"], fast["replicas"], round(fast["fleet_usd_per_hour"], 3)) == (
        "zen4-2vcpu", 12, 1.231)
    readme = (cost.parents[2] / "README.md").read_text()
    assert "15 replicas of zen4-1vcpu at $0.769/h" in readme and "12 of zen4-2vcpu at $1.231/h" in readme
