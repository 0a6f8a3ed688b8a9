"""What serve's size-bounded HTTP front costs per request, side by side in one run.

An upstream that answers every POST with a fixed 40-byte body (standing in for Triton, so
only the hop is measured) is called directly and through ``pipeline.serving.guard.HttpGuard``, one
keep-alive client, sequential requests, with bodies the size of one 32 px and one 224 px
float32 image (12 KiB, 588 KiB). Reports p50/p90/p99 and the added median.

    python benchmarks/bench_guard.py --out benchmarks/results/guard-cpu.md
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import statistics
import threading
import time
from pathlib import Path

from pipeline.core.machine import cpu_summary
from pipeline.serving.guard import HttpGuard
from pipeline.serving.serve import free_port

ANSWER = b'{"outputs":[{"name":"logits"}]}' + b" " * 8


def start_upstream(port: int) -> None:
    """An aiohttp server that reads the body and answers at once, in its own thread."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    async def main() -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    threading.Thread(target=asyncio.run, args=(main(),), daemon=True).start()


def timed(port: int, body: bytes, count: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    samples = []
    for i in range(count + 20):  # the first 20 warm the connection up
        started = time.perf_counter()
        conn.request("POST", "/v2/models/m/infer", body=body,
                     headers={"Content-Type": "application/octet-stream"})
        answer = conn.getresponse()
        assert answer.status == 200 and answer.read() == ANSWER
        if i >= 20:
            samples.append((time.perf_counter() - started) * 1000)
    conn.close()
    return samples


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return statistics.median(samples), cuts[89], cuts[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/guard-cpu.md"))
    args = parser.parse_args()
    upstream = free_port()
    start_upstream(upstream)
    time.sleep(1)
    front = free_port()
    guard = HttpGuard("127.0.0.1", front, f"http://127.0.0.1:{upstream}", 64 << 20)
    guard.start()
    lines = ["# serve's HTTP front: added latency per request", "",
             f"Command: `python benchmarks/bench_guard.py --count {args.count}`", "",
             f"CPU: {cpu_summary()}. One keep-alive client, sequential POSTs, {args.count} timed "
             f"after 20 warm-up; the upstream reads the body and answers 40 bytes at once "
             f"(standing in for Triton, so only the hop is measured). Client, front and "
             f"upstream share one Python process (and its GIL), as the front shares serve's.", "",
             "| body | path | p50 ms | p90 ms | p99 ms |", "|---|---|---|---|---|"]
    try:
        for label, size in (("12 KiB (1 x 3x32x32 fp32)", 3 * 32 * 32 * 4),
                            ("588 KiB (1 x 3x224x224 fp32)", 3 * 224 * 224 * 4)):
            body = bytes(size)
            direct = quantiles(timed(upstream, body, args.count))
            fronted = quantiles(timed(front, body, args.count))
            for name, q in (("direct", direct), ("through the front", fronted)):
                lines.append(f"| {label} | {name} | {q[0]:.3f} | {q[1]:.3f} | {q[2]:.3f} |")
            lines.append(f"| {label} | **added (p50)** | **{fronted[0] - direct[0]:.3f}** | | |")
    finally:
        guard.stop()
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
