"""``serve``: a real inference server for a bundle: NVIDIA Triton, started through PyTriton.

Triton does the serving: HTTP and gRPC (KServe v2 protocol), dynamic batching, health and
readiness endpoints (``/v2/health/live``, ``/v2/health/ready``), metrics, and the validation of
every request against the model's declared input (name, float32, ``[batch, 3, H, W]``). The
model itself is the bundle's ONNX file in an ONNX Runtime session, called once per batch
that Triton's dynamic batcher forms, inside Triton's Python-backend stub
(``pipeline.serving.backend``, from a model repository ``serve`` writes to a temporary folder).
PyTriton starts and stops that Triton (it bundles the server and the stub); its own ``bind``
is not used, because its hand-off from the stub to this process and back (shared memory and
ZeroMQ) cost more than the 3 ms a request the whole server may add.

Addresses are explicit: Triton would otherwise listen on every interface. Triton itself
binds to loopback ports of its own; what clients reach on ``--host`` (127.0.0.1 unless told
otherwise) and ``--port``/``--grpc-port``/``--metrics-port`` are the size-bounded fronts of
``pipeline.serving.guard``, because this Triton (2.51) has no request-size limit. SIGTERM and Ctrl-C
stop the server and free its ports.

PyTriton's Python-backend stub links the system ``libpython``; where the interpreter is
another build of the same version, model start-up fails (``'_thread.RLock' object has no
attribute '_recursion_count'``). The server process therefore gets ``LD_LIBRARY_PATH`` led by
the running interpreter's own library folder.
"""

from __future__ import annotations

import os
import signal
import socket
import sysconfig
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.core.bundle import Bundle
from pipeline.errors import EnvironmentUnavailable
from pipeline.options import ServeOptions
from pipeline.runtimes.registry import served_backend, served_model
from pipeline.runtimes.triton import ServedModel
from pipeline.serving.guard import GrpcGuard, HttpGuard, default_limit
from pipeline.serving.repository import preferred_batch_sizes, served_repository
from pipeline.serving.stats import ServeStats
from pipeline.serving.validate import Contract

INSTALL_HINT = 'pip install -e ".[serving]"'
LOOPBACK = "127.0.0.1"
# On SIGTERM Triton lets in-flight requests finish, but not a client that stalls mid-upload
# for its default 30 s.
EXIT_TIMEOUT_S = 5


# Metrics requests carry no body.
METRICS_LIMIT = 1 << 16


def serving_problem() -> str | None:
    """Why this environment cannot serve, or None."""
    try:
        import aiohttp  # noqa: F401
        import grpc  # noqa: F401
        import pytriton  # noqa: F401
        import tritonclient.http  # noqa: F401
    except ImportError as exc:
        return f"the serving extra is not installed ({exc.name}); install it with: {INSTALL_HINT}"
    return None


def request_limit(model: "ServedModel", options: ServeOptions) -> int:
    """The largest request body, in bytes, that the fronts accept."""
    if options.max_request_mb is not None:
        return int(options.max_request_mb * (1 << 20))
    return default_limit(options.max_batch_size, model.input_shape)


def check_ports_free(options: ServeOptions) -> None:
    """Exit 3 naming the port and its option, before Triton starts and fails less clearly."""
    for flag, port in (("--port", options.port), ("--grpc-port", options.grpc_port),
                       ("--metrics-port", options.metrics_port)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # As servers bind: a port whose old connections linger in TIME_WAIT is free, one
            # that something listens on is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((options.host, port))
            except OSError as exc:
                raise EnvironmentUnavailable(f"port {port} on {options.host} is not free "
                                             f"({exc.strerror}); choose another with {flag}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port nothing listens on now (for tests and the load generator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def with_own_libpython(env: dict[str, str]) -> dict[str, str]:
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p]
    return {**env, "LD_LIBRARY_PATH": os.pathsep.join(parts)}


def serve(bundle_dir: Path | str, options: ServeOptions = ServeOptions(), *,
          on_ready: Callable[[Endpoints], None] | None = None) -> None:
    """Serve the bundle until SIGTERM or Ctrl-C; ``on_ready`` gets the endpoints once ready."""
    options.check()
    bundle = Bundle.open(Path(bundle_dir))
    model = served_model(bundle, options.precision)
    problem = serving_problem()
    if problem:
        raise EnvironmentUnavailable(f"serve: {problem}")
    check_ports_free(options)
    os.environ.update(with_own_libpython(dict(os.environ)))

    from pytriton.client.exceptions import PyTritonClientError
    from pytriton.exceptions import PyTritonError
    from pytriton.triton import Triton, TritonConfig

    # Triton's stub opens the model again. Opening it here first turns a model the runtime
    # refuses into a clear error before Triton starts (Triton would exit, and PyTriton wait
    # out its start-up timeout first).
    served_backend().make_file(model.model_file, options.precision, threads=options.threads).close()
    stats = ServeStats()
    workspace = tempfile.TemporaryDirectory(prefix="pipeline-serve-")
    repository = served_repository(Path(workspace.name) / "models", model, options,
                                   preferred_batch_sizes(bundle, options.max_batch_size))

    # Triton on loopback ports of its own; clients reach the guards on the user's ports.
    inner = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    config = TritonConfig(model_repository=repository, http_address=LOOPBACK, http_port=inner["http"],
                          grpc_address=LOOPBACK, grpc_port=inner["grpc"],
                          metrics_address=LOOPBACK, metrics_port=inner["metrics"],
                          allow_sagemaker=False, allow_vertex_ai=False, exit_on_error=True,
                          exit_timeout_secs=EXIT_TIMEOUT_S,
                          # p50/p90/p95/p99 of each stage, beside the cumulative counters
                          metrics_config=["summary_latencies=true"])
    limit = request_limit(model, options)
    contract = Contract(model.name, model.input_name, model.output_name,
                        tuple(int(d) for d in model.input_shape), options.max_batch_size)
    guards = [HttpGuard(options.host, options.port, f"http://{LOOPBACK}:{inner['http']}", limit,
                        contract=contract, stats=stats),
              GrpcGuard(options.host, options.grpc_port, f"{LOOPBACK}:{inner['grpc']}", limit,
                        contract=contract, stats=stats),
              HttpGuard(options.host, options.metrics_port, f"http://{LOOPBACK}:{inner['metrics']}",
                        METRICS_LIMIT, flag="--metrics-port", stats=stats, metrics=True)]
    triton = Triton(config=config)
    started: list[Any] = []

    def stop_guards() -> None:
        for guard in started:  # no new requests first, then Triton finishes the ones in flight
            guard.stop()

    _stop_on_signals(stop_guards)
    try:
        try:
            triton.run()  # Triton loads the repository's model before it reports ready
        except (PyTritonClientError, PyTritonError) as exc:  # it exited, or never became ready
            raise EnvironmentUnavailable(f"serve: Triton did not start ({exc}); its log above "
                                         f"says why") from None
        if not model_ready(f"http://{LOOPBACK}:{inner['http']}", model.name):
            raise EnvironmentUnavailable(f"serve: Triton did not load {model.name} from "
                                         f"{model.model_file.name}; its log above says why")
        for guard in guards:
            guard.start()
            started.append(guard)
        if on_ready:
            on_ready(endpoints(model, options, limit))
        triton.serve()
    except KeyboardInterrupt:
        pass
    finally:
        stop_guards()
        triton.stop()
        workspace.cleanup()


def model_ready(url: str, name: str) -> bool:
    """Whether the Triton at ``url`` has ``name`` loaded and ready."""
    try:
        with urllib.request.urlopen(f"{url}/v2/models/{name}/ready", timeout=10) as answer:  # noqa: S310
            return answer.status == 200
    except OSError:  # refused, 400 (not loaded), or gone
        return False


@dataclass(frozen=True)
class Endpoints:
    """Where a ready server answers: what ``serve``'s ``on_ready`` receives."""

    model: str
    model_file: str
    http: str
    grpc: str
    metrics: str
    model_url: str
    ready: str
    infer: str
    input: str
    input_shape: tuple[int, ...]
    output: str
    max_request_bytes: int


def endpoints(model: ServedModel, options: ServeOptions, limit: int) -> Endpoints:
    base = f"http://{options.host}:{options.port}"
    return Endpoints(model=model.name, model_file=model.model_file.name, http=base,
                     grpc=f"{options.host}:{options.grpc_port}",
                     metrics=f"http://{options.host}:{options.metrics_port}/metrics",
                     model_url=f"{base}/v2/models/{model.name}", ready=f"{base}/v2/health/ready",
                     infer=f"{base}/v2/models/{model.name}/infer", input=model.input_name,
                     input_shape=tuple(model.input_shape), output=model.output_name,
                     max_request_bytes=limit)


def _stop_on_signals(first: Callable[[], None]) -> None:
    """SIGTERM and Ctrl-C run ``first`` (close the fronts), then stop the server the way Ctrl-C
    does. PyTriton's serve loop catches the KeyboardInterrupt and stops Triton itself, before
    any ``finally`` of ours, and Triton would wait out its exit timeout on the fronts' open
    connections to it; so the fronts close here, first."""
    def handler(signum: int, frame: Any) -> None:
        first()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
