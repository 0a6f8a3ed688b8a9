"""pipeline: train, export, verify, benchmark and serve ResNet image classifiers.

The Python API mirrors the command line, one function per stage (see ``pipeline.api``)::

    import pipeline

    pipeline.export("resnet18", out="exported/resnet18")
    assert pipeline.verify("exported/resnet18")

Importing this package loads no heavy library: torch and the runtimes load inside the calls.
"""

__version__ = "0.1.0"

from pipeline.api import (BenchResult, ExportResult, TrainResult, bench, export, predict,  # noqa: E402
                          quantize, report, run, train, verify)
from pipeline.errors import (CheckFailed, EnvironmentUnavailable, InputError,  # noqa: E402
                             PipelineError)


class _Package(type(__import__("sys"))):
    """``pipeline.export`` is the API function, although ``pipeline/export.py`` is a module.

    Importing a submodule makes Python set it as an attribute of its package, which would
    replace ``pipeline.export`` (the function) with the module the first time anything ran
    ``from pipeline.export import ...``. The stage functions keep their names here; the
    modules stay reachable as ``sys.modules["pipeline.export"]`` and through
    ``from pipeline.export import ...``, which reads sys.modules, not this attribute.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _STAGES and isinstance(value, type(__import__("sys"))):
            return
        super().__setattr__(name, value)


_STAGES = frozenset({"train", "export", "verify", "quantize", "bench", "predict", "run", "report"})
__import__("sys").modules[__name__].__class__ = _Package

__all__ = ["train", "export", "verify", "quantize", "bench", "predict", "run", "report",
           "TrainResult", "ExportResult", "BenchResult", "PipelineError", "InputError",
           "CheckFailed", "EnvironmentUnavailable", "__version__"]
