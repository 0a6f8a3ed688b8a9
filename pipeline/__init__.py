"""pipeline: train, export, verify, benchmark and serve ResNet image classifiers.

The Python API mirrors the command line, one function per stage (see ``pipeline.api``)::

    import pipeline

    pipeline.export("resnet18", out="exported/resnet18")
    assert pipeline.verify("exported/resnet18")

Importing this package loads no heavy library: torch and the runtimes load inside the calls.
The stages' modules live under ``pipeline.stages``; no module here shares a name with an API
function, so ``pipeline.export`` is always the function.
"""

from pipeline.api import (
                          BenchResult,
                          ExportResult,
                          TrainResult,
                          bench,
                          bench_offline,
                          classify,
                          deploy_kubernetes,
                          deploy_triton,
                          export,
                          predict,
                          quantize,
                          recheck,
                          report,
                          run,
                          serve,
                          train,
                          verify,
)
from pipeline.errors import (
                          CheckFailed,
                          EnvironmentUnavailable,
                          InputError,
                          PipelineError,
)
from pipeline.version import __version__

__all__ = ["train", "export", "verify", "quantize", "bench", "bench_offline", "predict", "classify", "run",
           "report", "recheck",
           "deploy_triton", "deploy_kubernetes", "serve", "TrainResult", "ExportResult", "BenchResult",
           "PipelineError", "InputError", "CheckFailed", "EnvironmentUnavailable", "__version__"]
