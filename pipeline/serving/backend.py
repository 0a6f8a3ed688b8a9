"""The model Triton runs for ``serve``: a Triton Python-backend model around the bundle's ONNX
Runtime session.

Triton's Python backend starts one stub process per model instance and hands it each batch
its dynamic batcher forms through shared memory; ``execute`` runs the batch in the runtime
right there. (PyTriton's own ``bind`` would add a second hop: the stub copies the batch into
PyTriton's tensor store and ZeroMQ carries it to the serving process and back; that hop cost
about 1.9 ms a request on a 2-core Xeon, most of the 3 ms overhead budget.)

``serve`` writes a model repository whose ``1/model.py`` imports this class; the model's
``config.pbtxt`` carries what to run in its ``parameters``: ``model_file``, ``precision``,
``threads`` (empty for ONNX Runtime's default). The runner comes from the registry, as in
every other stage.

Beside Triton's own ``nv_inference_*`` metrics, each instance reports on Triton's metrics
endpoint, through the Python backend's custom metrics, cumulative counters of its own:

    pipeline_model_request_count{model="resnet18"}          requests the model function ran
    pipeline_model_function_duration_us{model="resnet18"}   its time, once per request
    pipeline_model_infer_duration_us{model="resnet18"}      of which the runtime's infer

They follow Triton's convention for batches: each request of a batch is charged the batch's
whole time, so they compare with ``nv_inference_compute_infer_duration_us``. Each update is a
round trip to Triton's process (about 0.1 ms), so an instance adds its batches up and a thread
of its own sends them every ``FLUSH_S``, off the requests' path, and once more when it stops: a
scrape may lag by that much.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

# name -> description; all counters, labelled with the model's name
MODEL_METRICS = {
    "pipeline_model_request_count": "Requests the model function ran (each request of a batch once)",
    "pipeline_model_function_duration_us": "Cumulative time of the model function Triton's Python "
                                           "backend calls, charged to each request of the batch",
    "pipeline_model_infer_duration_us": "Cumulative time of the runtime's infer inside the model "
                                        "function, charged to each request of the batch",
}

FLUSH_S = 0.1

# The parameters serve writes into config.pbtxt for this model.
PARAMETERS = ("model_file", "precision", "threads")


def parameters(config: dict[str, Any]) -> dict[str, str]:
    """The model's string parameters from Triton's model config (JSON, as the backend gets it)."""
    given = config.get("parameters", {})
    return {key: given.get(key, {}).get("string_value", "") for key in PARAMETERS}


class TritonPythonModel:
    """Triton's Python-backend interface: ``initialize``, ``execute`` per batch, ``finalize``."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # only inside Triton's stub

        from pipeline.runtimes.registry import served_backend

        self._pb = pb_utils
        config = json.loads(args["model_config"])
        given = parameters(config)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        threads = int(given["threads"]) if given["threads"] else None
        self.runner = served_backend().make_file(Path(given["model_file"]),
                                                 given["precision"] or "fp32", threads=threads)
        labels = {"model": args["model_name"]}
        # The families must outlive their metrics, so both are kept.
        self.families = {name: pb_utils.MetricFamily(name=name, description=text,
                                                     kind=pb_utils.MetricFamily.COUNTER)
                         for name, text in MODEL_METRICS.items()}
        self.counters = {name: family.Metric(labels=labels) for name, family in self.families.items()}
        self.pending = dict.fromkeys(MODEL_METRICS, 0.0)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.flusher = threading.Thread(target=self._flush_until_stopped, name="metrics", daemon=True)
        self.flusher.start()

    def execute(self, requests: list[Any]) -> list[Any]:
        """One batch of Triton's dynamic batcher: the requests' images in one runtime call, each
        request answered with its rows (no copy for a lone request, one concatenation
        otherwise)."""
        pb = self._pb
        started = time.perf_counter()
        images = [pb.get_input_tensor_by_name(request, self.input_name).as_numpy()
                  for request in requests]
        batch = images[0] if len(images) == 1 else np.concatenate(images)
        infer_started = time.perf_counter()
        try:
            logits = self.runner.infer(batch)
        except Exception as exc:  # the runtime failed: a server fault, answered to each request
            error = pb.TritonError(f"the model failed on a batch of {len(batch)}: {exc}")
            return [pb.InferenceResponse(error=error) for _ in requests]
        infer_s = time.perf_counter() - infer_started
        ends = np.cumsum([len(part) for part in images])[:-1]
        answers = [pb.InferenceResponse(output_tensors=[pb.Tensor(self.output_name, rows)])
                   for rows in np.split(logits, ends)]
        function_s = time.perf_counter() - started
        count = len(requests)
        with self.lock:
            self.pending["pipeline_model_request_count"] += count
            self.pending["pipeline_model_function_duration_us"] += function_s * 1e6 * count
            self.pending["pipeline_model_infer_duration_us"] += infer_s * 1e6 * count
        return answers

    def flush(self) -> None:
        """Send the counters' pending increments to Triton."""
        with self.lock:
            pending = dict(self.pending)
            self.pending = dict.fromkeys(MODEL_METRICS, 0.0)
        for name, amount in pending.items():
            if amount:
                self.counters[name].increment(amount)

    def _flush_until_stopped(self) -> None:
        while not self.stopping.wait(FLUSH_S):
            self.flush()

    def finalize(self) -> None:
        self.stopping.set()
        self.flusher.join()
        self.flush()
        self.runner.close()
        self.counters.clear()  # metrics before their families
        self.families.clear()
