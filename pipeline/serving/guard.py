"""Size-bounded front doors for the Triton that ``serve`` starts.

The Triton that PyTriton 0.7.0 bundles (2.51) has no request-size limit on HTTP (it buffers a
body announced as 2 GB until it has all of it) and accepts gRPC messages up to 2 GB. So Triton
listens on loopback ports of its own, and what clients reach are these guards, on the ports
and address the user chose:

- ``HttpGuard`` (aiohttp): refuses a body whose ``Content-Length`` exceeds the limit at once
  (413, connection closed, the body never read; with ``Expect: 100-continue`` before the
  client sends it); a chunked body is read only up to the limit;
  a gzip/deflate body is inflated only up to the limit, so a small compressed bomb is refused
  too. Everything else (health, metadata, inference, Triton's own error answers, binary
  tensors with ``Inference-Header-Content-Length``) passes through unchanged.
- ``GrpcGuard`` (grpcio): a pass-through of every method of Triton's
  ``inference.GRPCInferenceService`` with ``grpc.max_receive_message_length`` set to the limit;
  gRPC refuses a larger message from its 5-byte length prefix (RESOURCE_EXHAUSTED), before
  the message is buffered.

The default limit is the largest valid binary request: the largest batch the model accepts as
float32 tensors, plus 1 MiB for the JSON header; ``--max-request-mb`` changes it.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

from pipeline.errors import EnvironmentUnavailable
from pipeline.serving.stats import ServeStats
from pipeline.serving.validate import (
    ClientError,
    Contract,
    check_grpc_infer,
    check_http,
    client_fault,
)

# Headers that belong to one connection, not to the request (RFC 9110 7.6.1), plus the ones
# aiohttp computes itself for the forwarded body.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length"})
CHUNK = 1 << 16
START_TIMEOUT_S = 30
STOP_GRACE_S = 5
INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")


def default_limit(max_batch_size: int, input_shape: tuple[int, ...]) -> int:
    """Bytes: the largest valid binary request, that is the largest accepted batch as float32
    tensors, plus 1 MiB for the JSON header."""
    return max_batch_size * math.prod(input_shape) * 4 + (1 << 20)


def too_large_message(size: int | str, limit: int) -> str:
    return (f"request body of {size} bytes exceeds this server's limit of {limit} bytes; send "
            f"binary tensors or smaller batches, or start serve with a larger --max-request-mb")


class HttpGuard:
    """An HTTP/1.1 front for one upstream HTTP server, with a body-size limit."""

    def __init__(self, host: str, port: int, upstream: str, limit: int, *,
                 flag: str = "--port", contract: Contract | None = None,
                 stats: ServeStats | None = None, metrics: bool = False) -> None:
        self.host, self.port, self.upstream, self.limit = host, port, upstream.rstrip("/"), limit
        self.flag = flag
        self.contract = contract  # inference requests are checked against it (4xx, not 5xx)
        # Inference requests' times go to ``stats``; on the metrics port (``metrics``) its
        # counters follow Triton's own in /metrics.
        self.stats, self.metrics = stats, metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._runner: Any = None
        self._session: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        started = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)  # this thread's loop, for aiohttp and the clean-up
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # the port taken, most often: reported by start()
                self._error = exc
                loop.run_until_complete(self._close())
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            # Connections still open (keep-alive, or cut off by a 413) end with the loop.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=main, name=f"http-guard-{self.port}", daemon=True)
        self._thread.start()
        if not started.wait(START_TIMEOUT_S):
            raise EnvironmentUnavailable(f"the HTTP front on port {self.port} did not start")
        if self._error is not None:
            raise EnvironmentUnavailable(f"cannot listen on {self.host}:{self.port} "
                                         f"({self._error}); choose another with {self.flag}") from None

    def stop(self) -> None:
        """Stop listening and close the connections to Triton; idempotent."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=STOP_GRACE_S + 5)

    async def _open(self) -> None:
        import aiohttp
        from aiohttp import web

        # No decompression and no Accept-Encoding of our own: bodies pass through as sent.
        self._session = aiohttp.ClientSession(
            auto_decompress=False, skip_auto_headers=("Accept-Encoding", "User-Agent"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle, expect_handler=self._expect)
        # auto_decompress=False: aiohttp would inflate a gzip body before the limit sees it.
        # shutdown_timeout: requests in flight at stop get this long to finish (Triton is up).
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     auto_decompress=False, shutdown_timeout=STOP_GRACE_S)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------------ requests
    async def _expect(self, request: Any) -> Any:
        """``Expect: 100-continue`` (curl sends it before large bodies): refuse before the
        client starts sending rather than invite the body (aiohttp's default handler would)."""
        if request.content_length is not None and request.content_length > self.limit:
            return self._refuse(413, too_large_message(request.content_length, self.limit))
        expect = request.headers.get("Expect", "").strip().lower()
        if request.version >= (1, 1):
            if expect != "100-continue":
                return self._refuse(417, f"Expect: {expect!r} is not supported")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # as aiohttp's own handler: the answer starts after
        return None

    async def _handle(self, request: Any) -> Any:
        import aiohttp
        from aiohttp import web

        started = time.perf_counter()
        if request.content_length is not None and request.content_length > self.limit:
            return self._refuse(413, too_large_message(request.content_length, self.limit))
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", "deflate"):
            return self._refuse(415, f"Content-Encoding {encoding!r} is not accepted; send the "
                                     f"body plain, gzip or deflate")
        try:
            body = await self._read_bounded(request, inflate=encoding != "identity")
        except zlib.error as exc:
            return self._refuse(400, f"the body is not valid {encoding} ({exc})")
        if body is None:
            return self._refuse(413, too_large_message(f"more than {self.limit}", self.limit))
        if self.contract is not None:
            try:
                check_http(request.method, request.rel_url.path, dict(request.headers), body,
                           self.contract)
            except ClientError as exc:
                return web.json_response({"error": str(exc)}, status=exc.status)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "content-encoding"}
        try:
            asked = time.perf_counter()
            async with self._session.request(request.method, self.upstream + request.rel_url.path_qs,
                                             headers=headers, data=body or None) as answer:
                payload = await answer.read()
                answered = time.perf_counter()
                kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
                if self.stats is not None and answer.status == 200:
                    if self.metrics and request.rel_url.path == "/metrics" \
                            and answer.headers.get("Content-Encoding", "identity") == "identity":
                        payload += self.stats.prometheus().encode()
                    elif INFER_PATH.match(request.rel_url.path):
                        self.stats.front("http", time.perf_counter() - started, answered - asked)
                return web.Response(status=_client_status(answer.status, payload), body=payload,
                                    headers=kept)
        except aiohttp.ClientError as exc:
            return self._refuse(502, f"the inference server behind this port did not answer "
                                     f"({type(exc).__name__})")

    async def _read_bounded(self, request: Any, *, inflate: bool) -> bytes | None:
        """The body (inflated when compressed), or None once it passes the limit."""
        inflater = zlib.decompressobj(32 + zlib.MAX_WBITS) if inflate else None  # gzip or zlib
        parts: list[bytes] = []
        size = received = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            received += len(chunk)
            if received > self.limit:
                return None
            if inflater is not None:
                chunk = inflater.decompress(chunk, self.limit + 1 - size)
                if inflater.unconsumed_tail:
                    return None
            size += len(chunk)
            if size > self.limit:
                return None
            parts.append(chunk)
        return b"".join(parts)

    @staticmethod
    def _refuse(status: int, message: str) -> Any:
        from aiohttp import web

        answer = web.json_response({"error": message}, status=status)
        answer.force_close()  # the rest of the body is never read: this connection is done
        return answer


def _client_status(status: int, payload: bytes) -> int:
    """Triton's 5xx for a request whose error message proves the client's fault: its 4xx."""
    if status < 500:
        return status
    try:
        message = json.loads(payload).get("error", "")
    except (ValueError, AttributeError):
        return status
    return client_fault(str(message)) or status


class GrpcGuard:
    """A gRPC pass-through to Triton's gRPC port that refuses messages over the limit, and
    inference requests the model cannot take (INVALID_ARGUMENT)."""

    def __init__(self, host: str, port: int, upstream: str, limit: int,
                 contract: Contract | None = None, stats: ServeStats | None = None) -> None:
        self.host, self.port, self.upstream, self.limit = host, port, upstream, limit
        self.contract = contract
        self.stats = stats
        self._server: Any = None
        self._channel: Any = None

    def start(self) -> None:
        import grpc

        unlimited = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self._channel = grpc.insecure_channel(self.upstream, options=unlimited)
        # SO_REUSEPORT (gRPC's default on Linux) would let a second server share a taken port.
        self._server = grpc.server(ThreadPoolExecutor(max_workers=32, thread_name_prefix="grpc-guard"),
                                   options=[("grpc.max_receive_message_length", self.limit),
                                            ("grpc.max_send_message_length", -1),
                                            ("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers((_PassThrough(self._channel, self.contract, self.stats),))
        try:
            bound = self._server.add_insecure_port(f"{self.host}:{self.port}")
        except RuntimeError:
            bound = 0
        if not bound:
            raise EnvironmentUnavailable(f"cannot listen on {self.host}:{self.port} for gRPC; "
                                         f"choose another with --grpc-port")
        self._server.start()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop (calls in flight get ``grace_s``), close the channel to Triton; idempotent."""
        server, channel, self._server, self._channel = self._server, self._channel, None, None
        if server is not None:
            server.stop(grace_s).wait(grace_s + 5)
        if channel is not None:
            channel.close()


def _deadline(context: Any) -> float | None:
    """The client's remaining time, or None where it set no deadline (gRPC then reports a
    remaining time of centuries)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e6 else remaining


def _forwarded_metadata(context: Any) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in context.invocation_metadata()
            if not k.startswith((":", "grpc-")) and k != "user-agent"]


class _PassThrough:
    """A ``grpc.GenericRpcHandler`` (gRPC needs only its ``service``): every method forwarded
    as raw bytes; ``ModelStreamInfer`` is Triton's one streaming method."""

    def __init__(self, channel: Any, contract: Contract | None = None,
                 stats: ServeStats | None = None) -> None:
        import grpc

        self._grpc = grpc
        self._channel = channel
        self._contract = contract
        self._stats = stats

    def service(self, details: Any) -> Any:
        grpc = self._grpc
        method = details.method
        if method.endswith("/ModelStreamInfer"):
            stream = self._channel.stream_stream(method)

            def forward_stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
                try:
                    yield from stream(requests, metadata=_forwarded_metadata(context),
                                      timeout=_deadline(context))
                except grpc.RpcError as exc:
                    context.abort(exc.code(), exc.details())
            return grpc.stream_stream_rpc_method_handler(forward_stream)

        unary = self._channel.unary_unary(method)
        infer = method.endswith("/ModelInfer")
        contract = self._contract if infer else None
        stats = self._stats if infer else None

        def forward(request: bytes, context: Any) -> bytes:
            started = time.perf_counter()
            if contract is not None:
                try:
                    check_grpc_infer(request, contract)
                except ClientError as exc:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            try:
                asked = time.perf_counter()
                answer = unary(request, metadata=_forwarded_metadata(context),
                               timeout=_deadline(context))
                if stats is not None:
                    done = time.perf_counter()
                    stats.front("grpc", done - started, done - asked)
                return answer
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) \
                        and client_fault(details):
                    code = grpc.StatusCode.INVALID_ARGUMENT
                context.abort(code, details)
        return grpc.unary_unary_rpc_method_handler(forward)

