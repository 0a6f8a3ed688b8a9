"""serve: a real Triton server (PyTriton) on the tiny bundle, on ephemeral loopback ports:
good, bad and concurrent requests, a client that hangs up, SIGTERM, and the port free again."""

from __future__ import annotations

import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli, run_module, write_images

pytest.importorskip("pytriton", reason="the serving extra is not installed: pip install -e '.[serving]'")
http = pytest.importorskip("tritonclient.http")

MODEL = "resnet18_cifar"


def _ports() -> list[int]:
    from pipeline.serving.serve import free_port

    return [free_port() for _ in range(3)]


def _wait_ready(port: int, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode(errors="replace")[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    raise AssertionError("server not ready in time")


@pytest.fixture(scope="module")
def server(tiny_bundle_master: Path, tmp_path_factory: pytest.TempPathFactory):
    bundle = Path(shutil.copytree(tiny_bundle_master, tmp_path_factory.mktemp("serve") / "b"))
    port, grpc_port, metrics_port = _ports()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", str(bundle), "--port", str(port),
         "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--max-batch-size", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_ready(port, process)
        yield {"bundle": bundle, "port": port, "grpc_port": grpc_port,
               "metrics_port": metrics_port, "process": process,
               "url": f"127.0.0.1:{port}"}
    finally:
        if process.poll() is None:
            process.kill()


def _infer(url: str, array: np.ndarray, dtype: str = "FP32", name: str = "input"):
    # Closed here, in the thread that made it: Triton's HTTP client runs on gevent, whose
    # hub is per thread, and one garbage-collected in another thread fails in __del__.
    client = http.InferenceServerClient(url)
    try:
        request = http.InferInput(name, list(array.shape), dtype)
        request.set_data_from_numpy(array, binary_data=True)
        return client.infer(MODEL, [request])
    finally:
        client.close()


def test_health_and_metadata_answer(server) -> None:
    client = http.InferenceServerClient(server["url"])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    config = client.get_model_config(MODEL)
    version = client.get_server_metadata()["version"]
    client.close()
    assert config["max_batch_size"] == 8 and "dynamic_batching" in config
    # deploy kubernetes pins the NGC image of this very Triton release
    from pipeline.serving.kubernetes import TRITON_VERSION

    assert version == TRITON_VERSION
    with urllib.request.urlopen(f"http://127.0.0.1:{server['metrics_port']}/metrics", timeout=10) as r:
        assert r.status == 200 and b"nv_inference_request_success" in r.read()


def test_good_requests_match_onnx_runtime(server) -> None:
    import onnxruntime as ort

    batch = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    served = _infer(server["url"], batch).as_numpy("logits")
    session = ort.InferenceSession(str(server["bundle"] / "model.sim.onnx"),
                                   providers=["CPUExecutionProvider"])
    local = session.run(None, {"input": batch})[0]
    assert served.shape == (3, 10) and np.allclose(served, local, atol=1e-5)


@pytest.mark.parametrize("case", ["shape", "dtype", "name", "too-big-batch"])
def test_bad_requests_get_an_error_and_the_server_goes_on(case: str, server) -> None:
    arrays = {"shape": (np.zeros((1, 3, 31, 32), np.float32), "FP32", "input"),
              "dtype": (np.zeros((1, 3, 32, 32), np.int32), "INT32", "input"),
              "name": (np.zeros((1, 3, 32, 32), np.float32), "FP32", "image"),
              "too-big-batch": (np.zeros((9, 3, 32, 32), np.float32), "FP32", "input")}
    array, dtype, name = arrays[case]
    with pytest.raises(Exception) as caught:
        _infer(server["url"], array, dtype, name)
    assert "InferenceServerException" in type(caught.value).__name__
    ok = _infer(server["url"], np.zeros((1, 3, 32, 32), np.float32)).as_numpy("logits")
    assert ok.shape == (1, 10)


def test_a_body_that_is_not_a_tensor_is_refused(server) -> None:
    request = urllib.request.Request(f"http://{server['url']}/v2/models/{MODEL}/infer",
                                     data=b"\x89PNG\r\n\x1a\n not json, not a tensor", method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    # Triton 2.51 itself answers 500; the front checks the request first: a 400 naming it
    assert caught.value.code == 400 and "not valid JSON" in json.loads(caught.value.read())["error"]
    assert _infer(server["url"], np.zeros((1, 3, 32, 32), np.float32)).as_numpy("logits").shape == (1, 10)


# --max-batch-size 8 of [3, 32, 32] float32: the default limit is 98304 B + 1 MiB.
LIMIT = 8 * 3 * 32 * 32 * 4 + (1 << 20)


def _binary_request(extra_headers: str = "") -> tuple[bytes, bytes]:
    """The head and body of a KServe binary-tensor request for one zero image, as raw HTTP."""
    body = np.zeros((1, 3, 32, 32), np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(body)}}]}).encode()
    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n{extra_headers}"
            f"Inference-Header-Content-Length: {len(header)}\r\n"
            f"Content-Length: {len(header) + len(body)}\r\n\r\n").encode()
    return head, header + body


def _raw_post(port: int, head: str, body: bytes, wait_s: float = 3) -> str:
    """Send a request's head and the first part of its body; the server's first answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(head.encode() + body)
        conn.settimeout(wait_s)
        return conn.recv(4096).decode(errors="replace")


def test_an_oversized_body_is_refused_without_reading_it(server) -> None:
    """Announce 2 GB and send a little: the answer (413) comes at once, from the head alone."""
    started = time.monotonic()
    answer = _raw_post(server["port"], f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {2 * 1024 ** 3}\r\n\r\n",
                       b"{" + b" " * 65536)
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - started < 3
    error = json.loads(answer.split("\r\n\r\n", 1)[1])["error"]
    assert str(2 * 1024 ** 3) in error and str(LIMIT) in error and "--max-request-mb" in error
    # a client that asks first (Expect: 100-continue, as curl does) is refused, not invited
    answer = _raw_post(server["port"], f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
                       f"Expect: 100-continue\r\nContent-Length: {2 * 1024 ** 3}\r\n\r\n", b"")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    # and one within the limit is invited, then served
    head, payload = _binary_request("Expect: 100-continue\r\n")
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as conn:
        conn.sendall(head)
        assert conn.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        conn.sendall(payload)
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
    assert _infer(server["url"], np.zeros((1, 3, 32, 32), np.float32)).as_numpy("logits").shape == (1, 10)


def test_a_chunked_body_is_cut_off_at_the_limit(server) -> None:
    """No Content-Length to refuse by: the body is read up to the limit, then refused."""
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // len(chunk) + 2))
    answer = _raw_post(server["port"], f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n", body, wait_s=10)
    assert answer.startswith("HTTP/1.1 413"), answer[:200]


def test_a_compressed_bomb_is_refused_and_real_gzip_works(server) -> None:
    import gzip

    bomb = gzip.compress(b"\0" * (16 << 20))  # 16 MiB of zeros in about 16 KB
    assert len(bomb) < LIMIT
    request = urllib.request.Request(f"http://{server['url']}/v2/models/{MODEL}/infer", data=bomb,
                                     method="POST", headers={"Content-Encoding": "gzip"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 413
    request = urllib.request.Request(f"http://{server['url']}/v2/models/{MODEL}/infer",
                                     data=b"not gzip at all", method="POST",
                                     headers={"Content-Encoding": "gzip"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400 and "not valid gzip" in json.loads(caught.value.read())["error"]
    # a compressed request within the limit is served as Triton's client sends it
    batch = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    client = http.InferenceServerClient(server["url"])
    data = http.InferInput("input", list(batch.shape), "FP32")
    data.set_data_from_numpy(batch, binary_data=True)
    zipped = client.infer(MODEL, [data], request_compression_algorithm="gzip",
                          response_compression_algorithm="gzip").as_numpy("logits")
    client.close()
    assert np.array_equal(zipped, _infer(server["url"], batch).as_numpy("logits"))


def test_grpc_serves_and_refuses_an_oversized_message(server) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server['grpc_port']}")
    assert client.is_server_ready() and client.is_model_ready(MODEL)

    def infer(array: np.ndarray):
        data = grpcclient.InferInput("input", list(array.shape), "FP32")
        data.set_data_from_numpy(array)
        return client.infer(MODEL, [data]).as_numpy("logits")

    batch = np.random.default_rng(2).standard_normal((3, 3, 32, 32), dtype=np.float32)
    assert np.array_equal(infer(batch), _infer(server["url"], batch).as_numpy("logits"))
    with pytest.raises(InferenceServerException) as caught:
        infer(np.zeros((LIMIT // (3 * 32 * 32 * 4) + 1, 3, 32, 32), np.float32))
    assert "RESOURCE_EXHAUSTED" in str(caught.value.status()) and str(LIMIT) in str(caught.value)
    assert infer(batch).shape == (3, 10)
    # Triton's one streaming method passes through too
    answers: list = []
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    data = grpcclient.InferInput("input", list(batch.shape), "FP32")
    data.set_data_from_numpy(batch)
    client.async_stream_infer(MODEL, [data])
    client.stop_stream()  # waits for the answers in flight
    assert len(answers) == 1 and answers[0][1] is None
    assert np.array_equal(answers[0][0].as_numpy("logits"), infer(batch))


def test_a_client_that_hangs_up_mid_request_harms_no_one(server) -> None:
    head, payload = _binary_request()
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as conn:
        image_bytes = 3 * 32 * 32 * 4
        conn.sendall(head + payload[:len(payload) - image_bytes + 100])  # 100 B of the image
    results = []

    def one(seed: int) -> None:
        batch = np.random.default_rng(seed).standard_normal((1, 3, 32, 32), dtype=np.float32)
        results.append(_infer(server["url"], batch).as_numpy("logits").shape)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [(1, 10)] * 8


def test_predict_through_the_server_matches_predict(server, tmp_path: Path) -> None:
    images = write_images(tmp_path / "imgs", count=4)
    local = run_cli("predict", server["bundle"], *images, "--json")
    remote = run_cli("predict", server["bundle"], *images, "--json", "--server",
                     f"http://{server['url']}")
    assert local.exit_code == 0 and remote.exit_code == 0, remote.stderr
    for a, b in zip(json.loads(local.stdout), json.loads(remote.stdout)):
        assert a["file"] == b["file"]
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert np.allclose([t["probability"] for t in a["top"]],
                           [t["probability"] for t in b["top"]], atol=1e-6)


# ----------------------------------------------------------------------------- client errors are 4xx
def _post(port: int, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{MODEL}/infer",
                                     data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _json_input(shape, datatype="FP32", name="input", data=None, **extra) -> bytes:
    count = int(np.prod(shape))
    tensor = {"name": name, "datatype": datatype, "shape": list(shape),
              "data": data if data is not None else [0.0] * count}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def _binary(shape, size=None, cut=0) -> tuple[bytes, dict]:
    payload = np.zeros(shape, np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(shape),
                                     "parameters": {"binary_data_size": size or len(payload)}}]}).encode()
    return header + payload[:len(payload) - cut], {"Inference-Header-Content-Length": str(len(header))}


HTTP_CASES = {
    "malformed JSON": (b"{not json", {}, 400, "not valid JSON"),
    "not an object": (b"[1, 2]", {}, 400, "JSON object"),
    "unknown input name": (_json_input((1, 3, 32, 32), name="image"), {}, 422, "unknown input 'image'"),
    "wrong datatype": (_json_input((1, 3, 32, 32), datatype="INT64"), {}, 422, "datatype 'INT64'"),
    "wrong shape": (_json_input((1, 3, 31, 32)), {}, 422, "shape [1, 3, 31, 32]"),
    "batch over the max": (_json_input((9, 3, 32, 32)), {}, 422, "batch 9 is outside 1..8"),
    "data of the wrong size": (_json_input((1, 3, 32, 32), data=[0.0] * 10), {}, 422, "holds 10 values"),
    "unknown output": (_json_input((1, 3, 32, 32), outputs=[{"name": "probs"}]), {}, 422,
                       "unknown output 'probs'"),
    "truncated binary tensor": (*_binary((1, 3, 32, 32), cut=100), 400, "truncated"),
    "binary size that is not the shape's": (*_binary((1, 3, 32, 32), size=12), 422,
                                            "does not match shape"),
    "bad header length": (b"{}", {"Inference-Header-Content-Length": "ten"}, 400, "not a number"),
}


@pytest.mark.parametrize("case", list(HTTP_CASES))
def test_a_bad_http_request_is_a_4xx_naming_the_field_and_the_next_is_served(case, server) -> None:
    body, headers, status, message = HTTP_CASES[case]
    code, answer = _post(server["port"], body, headers)
    assert code == status and message in answer["error"], (code, answer)
    honest, _ = _binary((1, 3, 32, 32))
    code, answer = _post(server["port"], honest, _binary((1, 3, 32, 32))[1])
    assert code == 200 and answer["outputs"][0]["shape"] == [1, 10]


def test_an_oversized_http_body_is_413(server) -> None:
    body = np.zeros((LIMIT // 4 + 1,), np.float32).tobytes()
    code, answer = _post(server["port"], body, {"Inference-Header-Content-Length": "0"})
    assert code == 413 and "exceeds this server's limit" in answer["error"]


def _grpc_request(shape, *, name="input", datatype="FP32", raw_cut=0, outputs=()):
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    del tensor  # the contents go in raw_input_contents, as tritonclient sends them
    payload = np.zeros(shape, np.float32).tobytes()
    request.raw_input_contents.append(payload[:len(payload) - raw_cut])
    for output in outputs:
        request.outputs.add(name=output)
    return request.SerializeToString()


GRPC_CASES = {
    "not a ModelInferRequest": (b"\xff\xff\xff garbage", "not a ModelInferRequest"),
    "unknown input name": (_grpc_request((1, 3, 32, 32), name="image"), "unknown input 'image'"),
    "wrong datatype": (_grpc_request((1, 3, 32, 32), datatype="INT64"), "datatype 'INT64'"),
    "wrong shape": (_grpc_request((1, 3, 31, 32)), "shape [1, 3, 31, 32]"),
    "batch over the max": (_grpc_request((9, 3, 32, 32)), "batch 9 is outside 1..8"),
    "truncated binary tensor": (_grpc_request((1, 3, 32, 32), raw_cut=100), "raw_input_contents holds"),
    "unknown output": (_grpc_request((1, 3, 32, 32), outputs=("probs",)), "unknown output 'probs'"),
}


@pytest.mark.parametrize("case", list(GRPC_CASES))
def test_a_bad_grpc_request_is_invalid_argument_and_the_next_is_served(case, server) -> None:
    import grpc

    raw, message = GRPC_CASES[case]
    with grpc.insecure_channel(f"127.0.0.1:{server['grpc_port']}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            call(raw, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
        assert message in caught.value.details()
        answer = call(_grpc_request((1, 3, 32, 32)), timeout=30)
    from tritonclient.grpc import service_pb2

    parsed = service_pb2.ModelInferResponse()
    parsed.ParseFromString(answer)
    assert list(parsed.outputs[0].shape) == [1, 10]


def test_tritons_own_client_fault_messages_map_to_4xx() -> None:
    """The list of Triton 2.51 answers that prove the client's fault, on its real messages."""
    from pipeline.serving.validate import client_fault

    assert client_fault("failed to parse the request JSON buffer: Invalid value. at 1") == 400
    assert client_fault("Unable to parse 'data': Shape does not match true shape of 'data' field") == 422
    assert client_fault("inference request batch-size must be <= 8 for 'resnet18_cifar'") == 422
    assert client_fault("failed to load model: out of memory") is None


def test_the_metrics_port_adds_serves_own_stage_times(server) -> None:
    """serve's counters follow Triton's on the metrics port; a level's breakdown from two
    scrapes counts exactly the requests sent, and its stages add up to the clients' mean."""
    import grpc
    from tritonclient.grpc import service_pb2

    from pipeline.stages.bench.breakdown import breakdown, settled_scrape, value

    metrics = f"http://127.0.0.1:{server['metrics_port']}/metrics"
    before = settled_scrape(metrics)
    batch = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    took = []
    for _ in range(5):
        started = time.perf_counter()
        _infer(server["url"], batch)
        took.append((time.perf_counter() - started) * 1e3)
    code, _ = _post(server["port"], _json_input((1, 3, 31, 32)), {})  # refused: never counted
    assert code == 422
    with grpc.insecure_channel(f"127.0.0.1:{server['grpc_port']}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for _ in range(3):
            service_pb2.ModelInferResponse().ParseFromString(
                call(_grpc_request((1, 3, 32, 32)), timeout=30))
    after = settled_scrape(metrics)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("pipeline_front_request_count", protocol="http") == 5
    assert delta("pipeline_front_request_count", protocol="grpc") == 3
    assert delta("pipeline_model_request_count", model=MODEL) == 8  # a request once, not per image
    assert delta("nv_inference_count", model=MODEL) == 13
    assert delta("pipeline_front_duration_us", protocol="http") >= \
        delta("pipeline_front_upstream_duration_us", protocol="http") > 0
    assert delta("pipeline_model_function_duration_us", model=MODEL) >= \
        delta("pipeline_model_infer_duration_us", model=MODEL) > 0
    assert value(after, "nv_inference_request_summary_us", model=MODEL, quantile="0.99") > 0

    stages = breakdown(before, after, MODEL, sum(took) / len(took))
    assert stages.requests == 8 and stages.model_ms > 0 and stages.handoff_ms >= 0
    assert sum(ms for _, ms, _ in stages.stages()) == pytest.approx(stages.total_ms)
    assert stages.triton_p99_ms > 0


def test_sigterm_stops_it_and_frees_the_port(server) -> None:
    """Last in this module: it stops the shared server."""
    process = server["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    # the fronts closed their connections to Triton first, so Triton stopped cleanly rather
    # than waiting out its exit timeout on them
    log = process.stderr.read().decode(errors="replace")
    assert "stopped" in log and "exited with failure" not in log, log[-2000:]
    with socket.socket() as probe:  # raises if anything still listens on it
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", server["port"]))


def test_port_in_use_exits_3_naming_it(tiny_bundle: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        result = run_module("serve", tiny_bundle, "--port", busy, timeout=60)
    assert result.returncode == 3 and str(busy) in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr


def test_bundle_without_an_export_exits_2(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    result = run_module("serve", tmp_path / "b", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.slow
def test_server_scenario_bench(tiny_bundle: Path, tmp_path: Path) -> None:
    """Closed-loop levels with their breakdown and CPU shares, then the Poisson search and its
    --verify-capacity run against the real Triton, and report's capacity from it."""
    bound = 1000.0
    result = run_cli("bench", tiny_bundle, "--scenario", "server", "--concurrency", "1,4",
                     "--seconds", "2", "--warmup-seconds", "1", "--iterations", "10",
                     "--budget-ms", "1000", "--arrival", "poisson", "--p99-ms", str(bound),
                     "--poisson-trials", "2", "--verify-capacity", "--machine", "ci-box")
    assert result.exit_code == 0, result.stderr
    doc = json.loads((tiny_bundle / "latency.json").read_text())
    rows = doc["server"]["rows"]
    assert [r["concurrency"] for r in rows] == [1, 4]
    for row in rows:
        assert row["scenario"] == "server" and row["errors"] == 0 and row["requests"] > 0
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        stages = row["breakdown"]
        assert stages["requests"] >= row["requests"] * 0.9 and stages["model_ms"] > 0
        assert row["cpu_ms_per_request"]["serve process"] > 0
    assert rows[0]["breakdown"]["mean_batch"] == 1.0
    assert doc["server"]["baseline"]["backend"] == "ort-cpu"
    assert doc["server"]["batched_ceiling"]["batch"] > 1
    assert doc["server"]["stop"] == {"exit_code": 0, "ports_free": True}
    assert doc["server"]["best"]["concurrency"] in (1, 4)

    search = doc["server"]["poisson"]
    ceiling = max(r["images_per_s"] for r in rows)
    assert search["p99_bound_ms"] == bound and search["ceiling_per_s"] == pytest.approx(ceiling, abs=0.01)
    assert "mlcommons-loadgen" in search["generator"] and len(search["trials"]) == 2
    first, second = search["trials"]
    assert first["target_per_s"] == pytest.approx(ceiling / 2, abs=0.01)
    # bisection: up after a pass, down after a miss
    assert (second["target_per_s"] > first["target_per_s"]) == first["within_bound"]
    for trial in search["trials"]:
        assert trial["requests"] >= 100 and trial["errors"] == 0
        assert trial["p50_ms"] <= trial["p99_ms"] <= trial["max_ms"]
        assert trial["within_bound"] == (trial["p99_ms"] <= bound)
        assert trial["breakdown"]["requests"] >= trial["requests"]
    passed = [t for t in search["trials"] if t["within_bound"]]
    assert search.get("best") == (max(passed, key=lambda t: t["target_per_s"]) if passed else None)
    report = (tiny_bundle / "report.md").read_text()
    assert "Server scenario" in report and "Recommended setting: concurrency" in report
    assert "Where a request's time goes" in report and "Overhead at concurrency 1" in report
    assert "Open loop: Poisson arrivals" in report

    # --verify-capacity: one more LoadGen run at 0.9x the capacity, as long as a trial
    best, checks = search["best"], search["checks"]
    assert best is not None, "a 1000 ms bound holds on the tiny model"
    capacity = best["target_per_s"]
    for check in checks:  # each at 90% of the capacity so far; a miss lowers it to its rate
        assert check["target_per_s"] == pytest.approx(0.9 * capacity, abs=0.01)
        assert check["requests"] >= 100
        assert check["within_bound"] == (check["p99_ms"] <= bound and check["errors"] == 0)
        capacity = check["target_per_s"] / 0.9 if check["within_bound"] else check["target_per_s"]
    assert 1 <= len(checks) <= 3 and (checks[-1]["within_bound"] or len(checks) == 3)
    assert all(not c["within_bound"] for c in checks[:-1])
    held = "held at 90%" if checks[-1]["within_bound"] else "not confirmed"
    assert "Capacity check (`--verify-capacity`)" in report and held in report
    assert doc["machine"]["label"] == "ci-box"
    costs = json.loads(run_cli("report", tiny_bundle / "latency.json", "--out", tmp_path, "--json",
                               "--price", "ci-box=0.5", "--p99-ms", str(bound), "--target-rate",
                               "50 requests/s").stdout)["costs"]
    poisson = next(r for r in costs["rows"] if r["source"] == "server Poisson")
    assert poisson["capacity_per_s"] == pytest.approx(capacity, abs=0.01)
    assert poisson["capacity_check"] == held
    assert poisson["replicas"] == math.ceil(50 / (poisson["capacity_per_s"] * 0.8))


@pytest.mark.parametrize("args, message", [
    (["--scenario", "server", "--arrival", "poisson"], "give it with --p99-ms"),
    (["--scenario", "server", "--p99-ms", "50"], "add --arrival poisson"),
    (["--arrival", "poisson", "--p99-ms", "50"], "add --scenario server"),
    (["--scenario", "offline", "--p99-ms", "50"], "add --scenario server"),
    (["--scenario", "server", "--arrival", "poisson", "--p99-ms", "50", "--poisson-trials", "0"],
     "--poisson-trials 0 must be from 1 to 20"),
])
def test_poisson_options_are_checked_before_anything_runs(tiny_bundle: Path, args, message) -> None:
    result = run_module("bench", tiny_bundle, *args, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--scenario", "server", "--verify-capacity"], "add --arrival poisson --p99-ms BOUND"),
    (["--verify-capacity"], "add --scenario server"),
    (["--machine", "my box"], "is not a usable label"),
    (["--scenario", "offline", "--images", ".", "--machine", "box"], "leave --machine out"),
])
def test_capacity_and_label_options_are_checked_before_anything_runs(tiny_bundle: Path, args,
                                                                     message) -> None:
    result = run_cli("bench", tiny_bundle, *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.output and not (tiny_bundle / "latency.json").exists()


def test_a_request_limit_that_is_not_positive_exits_2(tiny_bundle: Path) -> None:
    result = run_module("serve", tiny_bundle, "--max-request-mb", "0", timeout=60)
    assert result.returncode == 2 and "--max-request-mb 0 must be > 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_fronts_name_a_taken_port_and_a_missing_upstream() -> None:
    """The guards alone: a port taken after serve's own check is named with its option, and
    an HTTP front whose Triton is gone answers 502 in Triton's error format."""
    from pipeline.errors import EnvironmentUnavailable
    from pipeline.serving.guard import GrpcGuard, HttpGuard
    from pipeline.serving.serve import free_port

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        with pytest.raises(EnvironmentUnavailable, match=f"{busy}.*--metrics-port"):
            HttpGuard("127.0.0.1", busy, "http://127.0.0.1:1", 10, flag="--metrics-port").start()
        with pytest.raises(EnvironmentUnavailable, match=f"{busy}.*--grpc-port"):
            GrpcGuard("127.0.0.1", busy, "127.0.0.1:1", 10).start()
    port = free_port()
    guard = HttpGuard("127.0.0.1", port, f"http://127.0.0.1:{free_port()}", 1000)
    guard.start()
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=30)
        assert caught.value.code == 502 and "did not answer" in json.loads(caught.value.read())["error"]
    finally:
        guard.stop()
    with socket.socket() as probe:  # stopped: the port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
