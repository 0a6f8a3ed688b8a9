"""README's "Choosing a device" example: two latency.json files and a priced report.

Benches a trained, verified bundle (the one `python -m pipeline run` makes: its int8 and
OpenVINO gates have run on held-apart images) as two machines: all its cores under one label,
then one thread under another, the way a 2-vCPU and a 1-vCPU instance of the same CPU differ.
Each also gets the server scenario's Poisson search with --verify-capacity (what a served
replica sustains within the bound). Then `report` merges the two files with prices, once at
peak throughput (--out/peak) and once within the bound for a target rate (--out).
Everything lands in --out, so that README's report commands run as written on the committed
files.

    python -m pipeline run --out /tmp/cost/trained
    python benchmarks/cost_example.py --bundle /tmp/cost/trained --out benchmarks/results/cost
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

BACKENDS = "ort-cpu:fp32,ort-cpu:int8,openvino-cpu:fp32,openvino-cpu:int8,torch-cpu:fp32"
# Illustrative prices in US dollars per hour, the 1-vCPU machine at half the 2-vCPU one's (as
# cloud list prices scale with vCPUs within an instance family). Use your provider's.
PRICES = {"zen4-2vcpu": 0.1026, "zen4-1vcpu": 0.0513}


def pipeline(*args: str) -> None:
    print("python -m pipeline " + " ".join(args), file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pipeline", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cost"))
    parser.add_argument("--p99-ms", type=float, default=50.0)
    parser.add_argument("--target-rate", default="2000 images/s")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = str(args.bundle)
    single = ["--backends", BACKENDS, "--batch-sizes", "1,8", "--seconds", "3"]
    server = ["--scenario", "server", "--seconds", "10", "--arrival", "poisson", "--p99-ms",
              f"{args.p99_ms:g}", "--verify-capacity"]
    for label, threads in (("zen4-2vcpu", "2"), ("zen4-1vcpu", "1")):
        pipeline("bench", bundle, "--machine", label, "--threads", threads, *single)
        pipeline("bench", bundle, "--machine", label, "--threads", threads, *server)
        shutil.copyfile(args.bundle / "latency.json", args.out / f"{label}.json")
    (args.out / "prices.toml").write_text(
        "# Illustrative prices, US dollars per hour, by bench --machine label: the 1-vCPU\n"
        "# machine at half the 2-vCPU one's. Use your provider's list prices.\n[prices]\n"
        + "".join(f'"{label}" = {usd}\n' for label, usd in PRICES.items()), encoding="utf-8")
    files = [str(args.out / "zen4-2vcpu.json"), str(args.out / "zen4-1vcpu.json")]
    prices = ["--prices", str(args.out / "prices.toml")]
    pipeline("report", *files, *prices, "--out", str(args.out / "peak"))
    pipeline("report", *files, *prices, "--p99-ms", f"{args.p99_ms:g}", "--target-rate",
             args.target_rate, "--out", str(args.out))


if __name__ == "__main__":
    main()
