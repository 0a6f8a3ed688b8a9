"""``python -m pipeline``: one thin click command per stage.

The library does the work; commands parse options, call it, print, and choose the exit code:
0 ok, 1 a check failed, 2 usage or input error, 3 environment error. Nothing heavy (torch,
onnx, onnxruntime) is imported at module load, so ``--help`` answers at once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from pipeline import api
from pipeline.cli import render
from pipeline.core.checks import Check, latency_checks, parity_checks
from pipeline.core.records import ImageLoop, OfflineRun
from pipeline.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_CHECK_FAILED,
    EXIT_ENVIRONMENT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    InputError,
    PipelineError,
)
from pipeline.models.archs import ARCHS, describe
from pipeline.options import (
    MODEL,
    ARRIVALS,
    DEFAULT_MAX_SLOWDOWN,
    HEADROOM,
    CALIBRATION_METHODS,
    DEFAULT_MAX_TOP1_DROP,
    DEFAULT_MIN_AGREEMENT,
    EXPORTERS,
    FLOOR_MULTIPLE,
    GATED_PRECISIONS,
    PREDICT_PRECISIONS,
    SCALE_TERM,
    SCENARIOS,
    SWEEP,
    TRITON_GPU_PRECISIONS,
    TRITON_TARGETS,
    BenchOptions,
    ExportOptions,
    PredictOptions,
    QuantizeOptions,
    RunOptions,
    ScenarioOptions,
    ServeOptions,
    TrainOptions,
    TritonOptions,
    check_arrival,
    joined,
)
from pipeline.runtimes.registry import (
    predict_backends,
    registry_help,
)
from pipeline.version import __version__

if TYPE_CHECKING:  # loads the runtimes: only for the annotation
    from pipeline.serving.serve import Endpoints

# Every default the commands show comes from the option dataclasses, written once there.
EXPORT, QUANTIZE, TRAIN, RUN = ExportOptions(), QuantizeOptions(), TrainOptions(), RunOptions()
BENCH, SCENARIO, SERVE, TRITON = BenchOptions(), ScenarioOptions(), ServeOptions(), TritonOptions()
PREDICT = PredictOptions()


class PipelineGroup(click.Group):
    """Turns user-facing errors into one ``error:`` line and their exit code, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            # The reader went away (`... | head`): stop quietly, as Unix tools do, and point
            # stdout at /dev/null so the interpreter's last flush cannot complain again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(EXIT_BROKEN_PIPE)
        except Exception as exc:  # a bug, not a user error: its own exit code, with the trace
            import traceback

            traceback.print_exc(file=sys.stderr)
            click.echo(f"internal error: {type(exc).__name__}: {exc} (exit {EXIT_INTERNAL}; "
                       f"please report it with the trace above)", err=True)
            ctx.exit(EXIT_INTERNAL)


def _command_line(command: str, *operands: Any) -> str:
    """The command as the user typed it, for reports (argv when we were started that way)."""
    import shlex

    argv = sys.argv[1:]
    if command in argv:
        return "python -m pipeline " + shlex.join(argv[argv.index(command):])
    return "python -m pipeline " + shlex.join([command, *map(str, operands)])


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _log(message: str) -> None:
    click.echo(message, err=True)


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pipeline")
def cli() -> None:
    """Train, export, verify, benchmark and serve ResNet image classifiers.

    Stages share a bundle directory (default exported/<arch>) described by manifest.json.

    \b
    Example:
      python -m pipeline export --arch resnet18
      python -m pipeline verify exported/resnet18
    """


# ----------------------------------------------------------------------------- archs
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON only on stdout.")
def archs(as_json: bool) -> None:
    """List every architecture: parameters, GMACs, input size and preprocessing.

    \b
    Example:
      python -m pipeline archs
      python -m pipeline archs --json
    """
    rows = [describe(spec) for spec in ARCHS.values()]
    if as_json:
        emit_json(rows)
        return
    click.echo(render.archs_table(rows))


# ----------------------------------------------------------------------------- model options
def _apply(options: list[Any], func: Any) -> Any:
    """Decorate ``func`` with click options so they list in the order given."""
    for option in reversed(options):
        func = option(func)
    return func


def model_options(func: Any) -> Any:
    """Options that choose an architecture and its weights (export, train)."""
    options = [
        click.option("--arch", default=None, help=f"Architecture (see `archs`). Default {MODEL.arch}, "
                     "or the checkpoint's arch."),
        click.option("--num-classes", type=int, default=None,
                     help="Output classes (default 1000 ImageNet archs, 10 CIFAR archs)."),
        click.option("--weights", default=MODEL.weights, show_default=True,
                     help="random (fixed seed) or imagenet (torchvision's pretrained weights)."),
        click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
                     help="A state dict or a training checkpoint to load."),
        click.option("--class-names", default=None, help="Comma-separated class names."),
        click.option("--input-size", type=int, default=None,
                     help="Override the input size; preprocessing follows."),
        click.option("--seed", type=int, default=MODEL.seed, show_default=True,
                     help="Seed for random initialisation."),
    ]
    return _apply(options, func)


def tolerance_options(func: Any) -> Any:
    options = [
        click.option("--atol", type=float, default=None,
                     help=f"Absolute tolerance vs eager fp32 (numpy allclose). Default: the model's "
                          f"own rule, |candidate - fp64| <= {FLOOR_MULTIPLE:g} x its fp32 noise "
                          f"floor + {SCALE_TERM:g} x max|logit|."),
        click.option("--rtol", type=float, default=None,
                     help="Relative tolerance vs eager fp32 (with --atol; replaces the floor rule)."),
        click.option("--max-top1-drop", type=float, default=DEFAULT_MAX_TOP1_DROP, show_default=True,
                     help="Accuracy gate for int8/fp16/bf16: most top-1 points lost (labelled images)."),
        click.option("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT, show_default=True,
                     help="Accuracy gate: least share of images whose top-1 matches eager fp32."),
    ]
    return _apply(options, func)


# ----------------------------------------------------------------------------- export
@cli.command()
@model_options
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Bundle directory (default exported/<arch>).")
@click.option("--exporter", type=click.Choice(EXPORTERS), default=EXPORT.exporter,
              show_default=True, help="torch.onnx exporter: dynamo (torch.export) or legacy (TorchScript).")
@click.option("--opset", type=int, default=EXPORT.opset, show_default=True, help="ONNX opset.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--no-pt2", is_flag=True, help="Skip model.pt2 (the torch.export ExportedProgram).")
@click.option("--aoti", is_flag=True,
              help="Also compile AOTInductor packages (model.aoti-cpu.pt2, and model.aoti-cuda.pt2 "
                   "on a GPU machine); needs a C++ compiler.")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Also verify on these real images.")
@tolerance_options
@click.option("--verbose", "-v", is_flag=True, help="Show exporter output instead of capturing it.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and parity as JSON.")
@click.pass_context
def export(ctx: click.Context, arch: str | None, num_classes: int | None, weights: str,
           checkpoint: Path | None, class_names: str | None, input_size: int | None, seed: int,
           out: Path | None, exporter: str, opset: int, no_simplify: bool, no_pt2: bool,
           aoti: bool, images: Path | None, atol: float | None, rtol: float | None,
           max_top1_drop: float, min_agreement: float, verbose: bool, as_json: bool) -> None:
    """Export to ONNX (+ onnxsim), TorchScript and model.pt2, then verify parity.

    \b
    Example:
      python -m pipeline export --arch resnet18
      python -m pipeline export --arch resnet50 --aoti
      python -m pipeline export --arch resnet50 --weights imagenet --opset 17 --exporter legacy
      python -m pipeline export --checkpoint exported/resnet18/checkpoint.pt
    """
    result = api.export(arch, out=out, weights=weights, checkpoint=checkpoint,
                        num_classes=num_classes, class_names=class_names, input_size=input_size,
                        seed=seed, exporter=exporter, opset=opset, simplify=not no_simplify,
                        pt2=not no_pt2, aoti=aoti, images=images, atol=atol, rtol=rtol,
                        max_top1_drop=max_top1_drop, min_agreement=min_agreement,
                        verbose=verbose, log=_log)
    _finish_verify(ctx, result.parity, as_json, extra={"bundle": str(result.bundle),
                                                       "manifest": result.manifest})


def _finish_verify(ctx: click.Context, report: Any, as_json: bool,
                   extra: dict[str, Any] | None = None, title: str = "verify") -> None:
    checks = parity_checks(report)
    if as_json:
        emit_json({**(extra or {}), "parity": report.to_dict()})
    else:
        click.echo(render.parity_table(report))
        click.echo("")
        click.echo(render.checks_table(title, checks))
    _job_summary(title, checks)
    for gate in report.advisories:
        _log(f"warning: accuracy gate {gate.verdict or 'failed'} for {gate.candidate}, a "
             f"runtime-only precision: {gate.failed_on}; it does not decide the exit code and "
             f"is never recommended")
    for gate in report.gates:
        if gate.accepted_inconclusive:
            _log(f"warning: accuracy gate inconclusive for {gate.candidate}, let through by "
                 f"--accept-inconclusive (never recommended): {gate.failed_on}")
    if not report:
        _log(f"error: {report.failure_summary()}")
        ctx.exit(EXIT_ENVIRONMENT if report.environment_only else EXIT_CHECK_FAILED)


def _job_summary(title: str, checks: list[Check]) -> None:
    """With ``GITHUB_STEP_SUMMARY`` set (a GitHub Actions step), append the checks table there
    as Markdown: the table the terminal shows, failures first."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return
    try:
        with open(target, "a", encoding="utf-8") as summary:
            summary.write(render.checks_table(title, checks, markdown=True) + "\n")
    except OSError as exc:
        _log(f"warning: could not append the job summary to GITHUB_STEP_SUMMARY={target!r} "
             f"({exc.strerror or exc})")


def _given_option(ctx: click.Context, name: str, value: Any) -> Any:
    """``value`` when the user gave the option, None when it is click's default."""
    source = ctx.get_parameter_source(name)
    return value if source not in (None, click.core.ParameterSource.DEFAULT) else None


# ----------------------------------------------------------------------------- verify
@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Also compare on real images, preprocessed by the bundle's own spec.")
@tolerance_options
@click.option("--cpu-only", is_flag=True, help="Do not try the CUDA execution provider.")
@click.option("--precisions", default=None,
              help=f"Reduced precisions whose gates also decide the exit code "
                   f"({', '.join(GATED_PRECISIONS)}); gated on every CPU, emulated where it "
                   f"lacks the units. int8/fp16 files always decide it.")
@click.option("--localize", is_flag=True,
              help="Compare every candidate layer by layer against eager PyTorch and name the "
                   "first layer that diverges (failed candidates always are).")
@click.option("--accept-inconclusive", is_flag=True,
              help="Let a gate that is inconclusive (too few images to tell) through with a "
                   "warning; it is still never recommended.")
@click.option("--junit-xml", type=click.Path(path_type=Path), default=None,
              help="Also write every pair and gate as a JUnit test case (measured value, limit, "
                   "margin) to this file, for a CI system's test list.")
@click.option("--recheck", type=click.Path(path_type=Path), default=None,
              help="Judge this saved parity.json again against the limits given here (the "
                   "others: the file's), without running anything; instead of BUNDLE.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="With --recheck: write the re-judged parity.json here (never over the original).")
@click.option("--json", "as_json", is_flag=True, help="Print parity JSON only on stdout.")
@click.pass_context
def verify(ctx: click.Context, bundle: Path | None, images: Path | None, atol: float | None,
           rtol: float | None, max_top1_drop: float, min_agreement: float, cpu_only: bool,
           precisions: str | None, localize: bool, accept_inconclusive: bool,
           junit_xml: Path | None, recheck: Path | None, out: Path | None,
           as_json: bool) -> None:
    """Check artifact hashes, fp32 parity vs PyTorch, and the accuracy gate for int8/fp16/bf16.

    The gate states its uncertainty: 95% one-sided bounds on the disagreement with fp32
    (Clopper-Pearson) and on the top-1 drop (Newcombe, paired). It passes when the worst end
    of each is within its limit, fails when the best end of one is outside it, and is
    inconclusive otherwise, saying how many images would decide it at the observed rates.

    Exit 1 when a file changed, a pair exceeds its tolerance, or a gate that decides the exit
    code fails or is inconclusive (unless --accept-inconclusive): the int8/fp16 files' and
    those named with --precisions (bf16 and OpenVINO's auto otherwise only advise). Exit 3
    when a CPU comparison cannot run in this environment.
    The gate evaluates on --images (labelled when its sub-folders are the model's classes),
    or on the validation split of a bundle trained here. A failed ONNX or .pt2 pair, and a
    failed int8 gate, is compared layer by layer: the table names the first divergent layer.

    \b
    Example:
      python -m pipeline verify exported/resnet18
      python -m pipeline verify exported/resnet18 --images photos/ --max-top1-drop 0.5
      python -m pipeline verify exported/resnet18 --images photos/ --precisions bf16
      python -m pipeline verify exported/resnet18 --localize
      python -m pipeline verify exported/resnet18 --atol 1e-4 --rtol 1e-3
      python -m pipeline verify exported/resnet18 --junit-xml reports/verify.xml
      python -m pipeline verify --recheck exported/resnet18/parity.json --max-top1-drop 0.5
    """
    if recheck is not None:
        if bundle is not None or images is not None or precisions or localize or cpu_only:
            raise InputError("--recheck judges a saved parity.json and runs nothing: give no "
                             "BUNDLE, --images, --precisions, --localize or --cpu-only with it")
        report = api.recheck(recheck, atol=atol, rtol=rtol,
                             max_top1_drop=_given_option(ctx, "max_top1_drop", max_top1_drop),
                             min_agreement=_given_option(ctx, "min_agreement", min_agreement),
                             accept_inconclusive=True if accept_inconclusive else None,
                             out=out, junit_xml=junit_xml)
        _finish_verify(ctx, report, as_json, title=f"verify --recheck {recheck}")
        return
    if bundle is None:
        raise InputError("verify needs a BUNDLE folder (or --recheck PARITY_JSON)")
    if out is not None:
        raise InputError("--out goes with --recheck (verify writes BUNDLE/parity.json)")
    report = api.verify(bundle, atol=atol, rtol=rtol, images=images, cuda=not cpu_only,
                        max_top1_drop=max_top1_drop, min_agreement=min_agreement,
                        precisions=precisions, localize=localize,
                        accept_inconclusive=accept_inconclusive, junit_xml=junit_xml)
    _finish_verify(ctx, report, as_json)


# ----------------------------------------------------------------------------- quantize
@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--precision", "precisions", default=joined(QUANTIZE.precisions), show_default=True,
              help="Variants to write: int8 (static QDQ, for CPUs and TensorRT), fp16 (for GPUs).")
@click.option("--calibration", default=None,
              help="int8 calibration images: an image folder, 'train' (the split train recorded; "
                   "the default for trained bundles) or 'synthetic' (offline demo).")
@click.option("--count", type=int, default=QUANTIZE.count, show_default=True,
              help="Calibration images to use.")
@click.option("--method", type=click.Choice(CALIBRATION_METHODS), default=QUANTIZE.method,
              show_default=True, help="Calibration method.")
@click.option("--seed", type=int, default=QUANTIZE.seed, show_default=True,
              help="Seed for choosing images.")
@click.option("--reduce-range/--full-range", default=None,
              help="7-bit int8 weights, which cannot saturate ORT's AVX2 kernels. Default: "
                   "7-bit on CPUs without VNNI, 8-bit with it.")
@click.option("--repair", is_flag=True,
              help="If int8 falls short of the gate's agreement limit on the repair images, "
                   "repair it: cross-layer equalization, then the layers with the largest error "
                   "share kept in float (at most 10% of them), each re-checked.")
@click.option("--repair-images", default=None,
              help="Images to judge the repair on (default: the calibration images); verify "
                   "refuses them as evaluation images.")
@click.option("--json", "as_json", is_flag=True, help="Print the quantization record as JSON only.")
def quantize(bundle: Path, precisions: str, calibration: str | None, count: int, method: str,
             seed: int, reduce_range: bool | None, repair: bool, repair_images: str | None,
             as_json: bool) -> None:
    """Write model.int8.onnx and model.fp16.onnx from the exported fp32 model.

    Then `verify` gates them on accuracy and `bench` times them.

    \b
    Example:
      python -m pipeline quantize exported/resnet18 --calibration photos/
      python -m pipeline quantize exported/resnet18 --calibration photos/ --repair
      python -m pipeline quantize exported/resnet18 --precision int8 --method entropy
      python -m pipeline quantize exported/resnet18 --calibration synthetic --count 200
    """
    _log(f"quantizing {bundle}/")
    record = api.quantize(bundle, precisions=precisions, calibration=calibration, count=count,
                          method=method, seed=seed, reduce_range=reduce_range, repair=repair,
                          repair_images=repair_images, log=_log).record
    if as_json:
        emit_json({precision: info.to_dict() for precision, info in record.items()})
    else:
        for precision, info in record.items():
            calib = info.calibration
            extra = (f", calibrated on {calib['count']} images from {calib['source']} ({calib['method']})"
                     if calib else "")
            click.echo(f"{precision}: {bundle}/model.{precision}.onnx{extra}")
        click.echo(f"next: python -m pipeline verify {bundle}")


# ----------------------------------------------------------------------------- train
def train_options(func: Any) -> Any:
    options = [
        click.option("--arch", default=None, help=f"Architecture (see `archs`). Default {MODEL.arch}."),
        click.option("--data", default=TRAIN.data, show_default=True,
                     help="Image folder (train/ + val/, or class folders), cifar10:DIR, or synthetic."),
        click.option("--out", type=click.Path(path_type=Path), default=None,
                     help="Bundle directory (default exported/<arch>)."),
        click.option("--epochs", type=int, default=None,
                     help=f"Epochs (default {TRAIN.epochs}; run: {RUN.epochs})."),
        click.option("--batch-size", type=int, default=None,
                     help=f"Batch size (default {TRAIN.batch_size}; run: {RUN.batch_size})."),
        click.option("--lr", type=float, default=None, help="Learning rate (default 0.05 SGD, 1e-3 Adam/AdamW)."),
        click.option("--optimizer", default=TRAIN.optimizer, show_default=True,
                     help="sgd (momentum, nesterov), adam or adamw."),
        click.option("--weight-decay", type=float, default=TRAIN.weight_decay, show_default=True),
        click.option("--schedule", default=TRAIN.schedule, show_default=True,
                     help="cosine, onecycle (warm-up then anneal, stepped every batch), step, "
                          "plateau or none."),
        click.option("--label-smoothing", type=float, default=TRAIN.label_smoothing, show_default=True),
        click.option("--weights", default=MODEL.weights, show_default=True,
                     help="random (train from scratch) or imagenet (fine-tune torchvision's weights)."),
        click.option("--freeze-backbone", is_flag=True, help="Train the classifier head only."),
        click.option("--input-size", type=int, default=None,
                     help="Override the input size (default: the arch's; 64 for synthetic data)."),
        click.option("--val-split", type=float, default=TRAIN.val_split, show_default=True,
                     help="Validation share when --data is one folder of classes."),
        click.option("--seed", type=int, default=MODEL.seed, show_default=True),
        click.option("--workers", type=int, default=None,
                     help="DataLoader worker processes (default 0 for --data synthetic, whose "
                          "images are in memory; 2 otherwise)."),
        click.option("--device", default=TRAIN.device, show_default=True, help="auto, cpu or cuda."),
        click.option("--synthetic-per-class", type=int, default=TRAIN.synthetic_per_class, show_default=True,
                     help="Images per class for --data synthetic."),
    ]
    return _apply(options, func)


def _given(ctx: click.Context, kwargs: dict[str, Any], resuming: bool) -> dict[str, Any]:
    """Resuming, only the options typed on this command line override the interrupted run's."""
    from click.core import ParameterSource

    if not resuming:
        return kwargs
    return {key: value for key, value in kwargs.items()
            if ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE}


@cli.command()
@train_options
@click.option("--resume", default=None, help="Continue from a last.pt written by train.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON only.")
@click.pass_context
def train(ctx: click.Context, as_json: bool, **kwargs: Any) -> None:
    """Train or fine-tune a ResNet; writes checkpoint.pt, last.pt, history and metrics.

    \b
    Example:
      python -m pipeline train --arch resnet18 --data path/to/folder --epochs 10
      python -m pipeline train --arch resnet50 --data birds/ --weights imagenet --freeze-backbone
      python -m pipeline train --arch resnet18_cifar --data cifar10:data/ --optimizer sgd --schedule plateau
      torchrun --nproc_per_node=2 -m pipeline train --arch resnet50 --data photos/
    """
    resume = kwargs.pop("resume")
    try:
        result = api.train(resume=resume, log=_log, **_given(ctx, kwargs, bool(resume)))
    except KeyboardInterrupt:
        _log("error: interrupted")
        ctx.exit(EXIT_INTERRUPTED)
    if as_json:
        emit_json(result.record.to_dict())
    elif result.record.rank == 0:
        click.echo(f"best val accuracy {result.best_val_acc:.4f}; checkpoint "
                   f"{result.bundle}/checkpoint.pt")


# ----------------------------------------------------------------------------- run
@cli.command()
@train_options
@click.option("--backends", default=joined(RUN.backends), show_default=True,
              help="Backends for the bench stage (every precision each runs).")
@click.option("--batch-sizes", default=joined(RUN.batch_sizes), show_default=True,
              help="Batch sizes for the bench stage.")
@click.option("--bench-seconds", type=float, default=RUN.bench_seconds, show_default=True,
              help="Minimum timed seconds per bench row.")
@click.option("--bench-iterations", type=int, default=RUN.bench_iterations, show_default=True)
@click.pass_context
def run(ctx: click.Context, backends: str, batch_sizes: str, bench_seconds: float,
        bench_iterations: int, **kwargs: Any) -> None:
    """Train, export, verify, bench and report into one bundle.

    With no options it trains resnet18 on the built-in synthetic shapes, offline.

    \b
    Example:
      python -m pipeline run
      python -m pipeline run --arch resnet50 --data path/to/folder --epochs 10
    """
    try:
        result = api.run(backends=backends, batch_sizes=batch_sizes, bench_seconds=bench_seconds,
                         bench_iterations=bench_iterations, command=_command_line("run"),
                         log=_log, **kwargs)
    except KeyboardInterrupt:
        _log("error: interrupted")
        ctx.exit(EXIT_INTERRUPTED)
    click.echo(render.parity_table(result.parity))
    click.echo(render.latency_table(result.latency.rows))
    click.echo(f"bundle {result.bundle}: best val accuracy {result.training.best_val_acc:.4f}, "
               f"parity {'passed' if result.parity else 'FAILED'}; see {result.bundle}/report.md")
    if not result.parity:
        ctx.exit(EXIT_CHECK_FAILED)


# ----------------------------------------------------------------------------- bench
def _registry_help() -> str:
    return registry_help()


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--backends", default=None,
              help="Comma-separated backends, or backend:precision (default all): " + _registry_help() + ".")
@click.option("--precisions", default=None,
              help="Only these precisions: fp32, int8, fp16, bf16, auto (OpenVINO's own choice).")
@click.option("--batch-sizes", default=SWEEP, show_default=True,
              help="Batch sizes to time (1,8,32), or sweep: 1, 2, 4, ... until images/s gains "
                   "less than 5% over the best, with two back-off steps (the throughput peak).")
@click.option("--iterations", type=int, default=BENCH.iterations, show_default=True,
              help="Minimum timed iterations.")
@click.option("--seconds", type=float, default=BENCH.seconds, show_default=True,
              help="Minimum timed seconds.")
@click.option("--warmup-seconds", type=float, default=BENCH.warmup_s, show_default=True,
              help="Minimum warm-up seconds (and always >= 10 iterations).")
@click.option("--threads", type=int, default=None, help="Threads for every CPU backend (default: all cores).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Also run the classic per-image loop over these files.")
@click.option("--budget-ms", type=float, default=None, help="Latency budget to check at p90.")
@click.option("--scenario", type=click.Choice(SCENARIOS), default=SCENARIOS[0],
              show_default=True, help="server: serve with Triton and drive it with concurrent "
                                      "loopback clients (the serving extra). offline: images/s "
                                      "from the --images files to labels through predict's "
                                      "engine, beside the decode and inference ceilings.")
@click.option("--fast-decode", is_flag=True, help="--scenario offline: decode large JPEGs at a "
                                                  "reduced scale, as predict --fast-decode does.")
@click.option("--concurrency", default=joined(SCENARIO.concurrency), show_default=True,
              help="Concurrent clients per load level (--scenario server).")
@click.option("--arrival", type=click.Choice(ARRIVALS), default=SCENARIO.arrival, show_default=True,
              help="--scenario server: closed runs the --concurrency levels; poisson then also "
                   "sends requests on a Poisson schedule (MLPerf LoadGen) and searches the "
                   "highest rate whose p99, counted from each scheduled send, is within --p99-ms.")
@click.option("--p99-ms", type=float, default=None, help="The p99 bound of --arrival poisson.")
@click.option("--poisson-trials", type=int, default=SCENARIO.poisson_trials, show_default=True,
              help="At most this many Poisson runs of --seconds each (the search bisects the rate).")
@click.option("--verify-capacity", is_flag=True,
              help="After the Poisson search, run its load once more at 0.9x the capacity found "
                   "and record whether the p99 held (report marks the capacity 'held at 90%' or "
                   "'not confirmed').")
@click.option("--machine", "machine", default=None, metavar="LABEL",
              help="Your name for this machine in latency.json, e.g. c7i.large [default: the "
                   "hostname]; report groups rows and looks up --price by it.")
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="Regression gate: compare each row with this earlier latency.json's row for "
                   "the same target and batch on the same machine fingerprint; exit 1 when one "
                   "is slower than --max-slowdown allows, significantly over the windows.")
@click.option("--max-slowdown", type=float, default=DEFAULT_MAX_SLOWDOWN, show_default=True,
              help="Regression gate: the slowdown allowed (0.10: 10% slower).")
@click.option("--baseline-rerun", type=click.Path(path_type=Path), default=None,
              help="Regression gate: re-measure this baseline model (a bundle folder or an .onnx) "
                   "in this run, alternating windows with the bundle's: the comparison that holds "
                   "on a noisy shared machine, and needed when --baseline's machine differs.")
@click.option("--force", is_flag=True, help="Regression gate: compare with a baseline of another "
                                            "architecture.")
@click.option("--junit-xml", type=click.Path(path_type=Path), default=None,
              help="Also write every row (and regression test) as a JUnit test case to this file.")
@click.option("--strict", is_flag=True, help="Exit 3 if any requested backend could not run.")
@click.option("--verbose", "-v", is_flag=True, help="Print the per-image lines of the --images loop.")
@click.option("--json", "as_json", is_flag=True, help="Print latency JSON only on stdout.")
@click.pass_context
def bench(ctx: click.Context, bundle: Path, backends: str | None, precisions: str | None,
          batch_sizes: str, iterations: int,
          seconds: float, warmup_seconds: float, threads: int | None, images: Path | None,
          budget_ms: float | None, scenario: str, fast_decode: bool, concurrency: str,
          arrival: str, p99_ms: float | None, poisson_trials: int, verify_capacity: bool,
          machine: str | None, baseline: Path | None,
          max_slowdown: float, baseline_rerun: Path | None, force: bool, junit_xml: Path | None,
          strict: bool, verbose: bool, as_json: bool) -> None:
    """Per-image latency on every backend this machine has, each in its own process.

    Writes latency.json, report.md and latency.png into the bundle.

    \b
    Example:
      python -m pipeline bench exported/resnet18
      python -m pipeline bench exported/resnet18 --backends ort-cpu,torch-cpu --batch-sizes 1,8
      python -m pipeline bench exported/resnet18 --images photos/ --budget-ms 20 --verbose
      python -m pipeline bench exported/resnet18 --scenario server --concurrency 1,4,16 --seconds 10
      python -m pipeline bench exported/resnet18 --scenario server --arrival poisson --p99-ms 100
      python -m pipeline bench exported/resnet18 --machine c7i.large --scenario server --arrival poisson --p99-ms 100 --verify-capacity
      python -m pipeline bench exported/resnet18 --scenario offline --images photos/
      python -m pipeline bench exported/resnet18 --baseline old/latency.json --max-slowdown 0.10
      python -m pipeline bench exported/resnet18 --baseline-rerun old-bundle/ --junit-xml bench.xml
    """
    check_arrival(scenario, arrival, p99_ms)
    result = api.bench(bundle, backends=backends, precisions=precisions, batch_sizes=batch_sizes,
                       iterations=iterations, seconds=seconds, warmup_seconds=warmup_seconds,
                       threads=threads, images=images, budget_ms=budget_ms, progress=not as_json,
                       command=_command_line("bench", bundle), scenario=scenario,
                       concurrency=concurrency, arrival=arrival, p99_ms=p99_ms,
                       poisson_trials=poisson_trials, fast_decode=fast_decode, baseline=baseline,
                       max_slowdown=max_slowdown, baseline_rerun=baseline_rerun, force=force,
                       junit_xml=junit_xml, machine=machine, verify_capacity=verify_capacity,
                       log=_log)
    if isinstance(result, OfflineRun):
        if as_json:
            emit_json(result.to_dict())
        else:
            click.echo(render.offline_table(result))
            _log(f"wrote {result.path}")
        return
    if as_json:
        emit_json(result.doc.to_dict())
    elif scenario == "server":
        click.echo(render.server_table(result.doc.server))
    else:
        click.echo(render.latency_table(result.rows))
        _print_image_loops(result.doc.images, verbose)
        best = result.recommendation.fastest_batch1
        if best:
            click.echo(f"best latency, fastest verified at batch 1: {best.backend} "
                       f"{best.precision} (p50 {best.p50_ms:.2f} ms)")
        bulk = result.recommendation.best_throughput
        if bulk:
            click.echo(f"best throughput, verified: {bulk.backend} {bulk.precision} at "
                       f"batch {bulk.batch} ({bulk.images_per_s:.1f} images/s)")
        if result.doc.regression:
            click.echo("")
            click.echo(render.regression_table(result.doc.regression))
        for warning in result.warnings:
            _log(f"warning: {warning}")
        _log(f"wrote {result.bundle}/latency.json, report.md, latency.png")
    if scenario == "single-stream":
        checks = latency_checks(result.doc, budget_ms)
        if not as_json and (baseline or baseline_rerun or budget_ms is not None):
            click.echo("")
            click.echo(render.checks_table("bench", checks))
        _job_summary("bench", checks)
    if not result:
        regressed = result.doc.regression.regressed
        _log(f"error: {len(regressed)} row(s) slower than the baseline by more than "
             f"{100 * max_slowdown:g}%: " + ", ".join(f"{r.target} batch {r.batch} "
                                                      f"({100 * r.slowdown:+.1f}%)" for r in regressed))
        ctx.exit(EXIT_CHECK_FAILED)
    if strict and result.unavailable:
        names = sorted({row.backend for row in result.unavailable})
        _log(f"error: --strict: backends could not run: {', '.join(names)}")
        ctx.exit(EXIT_ENVIRONMENT)


def _print_image_loops(loops: list[ImageLoop], verbose: bool) -> None:
    for loop in loops:
        for skipped in loop.sequential.skipped:
            _log(f"warning: skipped {skipped}")
    for line in render.image_loops(loops, verbose=verbose):
        click.echo(line)


# ----------------------------------------------------------------------------- report
@cli.command()
@click.argument("latency_files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Folder for report.md and report.png.")
@click.option("--budget-ms", type=float, default=None, help="Latency budget to check at p90.")
@click.option("--price", "prices", multiple=True, metavar="LABEL=USD_PER_HOUR",
              help="A machine's price per hour, by its bench --machine label (repeatable): adds "
                   "each verified configuration's cost per million images.")
@click.option("--prices", "prices_file", type=click.Path(path_type=Path), default=None,
              metavar="FILE.toml", help='Prices from a TOML file: "LABEL" = USD_PER_HOUR lines '
                                        'under [prices]; --price overrides it.')
@click.option("--p99-ms", type=float, default=None,
              help="A p99 bound: each configuration's capacity and cost within it (the Poisson "
                   "search's where a file has one, otherwise rows whose p99 is within it).")
@click.option("--target-rate", default=None, metavar="'R images/s' | 'R requests/s'",
              help="A load to serve within --p99-ms: the replicas each configuration needs and "
                   "the fleet's cost per hour.")
@click.option("--headroom", type=float, default=HEADROOM, show_default=True,
              help="The share of its measured capacity each replica is planned to carry.")
@click.option("--force", is_flag=True, help="Merge latency files of different archs or input "
                                            "sizes, or of different machines under one label.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the recommendation (and the cost table) as JSON.")
def report(latency_files: tuple[Path, ...], out: Path, budget_ms: float | None,
           prices: tuple[str, ...], prices_file: Path | None, p99_ms: float | None,
           target_rate: str | None, headroom: float, force: bool, as_json: bool) -> None:
    """Merge latency.json files from several machines into one comparison, with what each
    configuration costs when given prices.

    \b
    Example:
      python -m pipeline report cpu-box/latency.json gpu-box/latency.json --out compare/
      python -m pipeline report a/latency.json b/latency.json --price c7i.large=0.0893 --price g6.xlarge=0.8048
      python -m pipeline report a/latency.json b/latency.json --prices prices.toml --p99-ms 100 --target-rate '400 images/s'
    """
    result = api.report(list(latency_files), out=out, budget_ms=budget_ms, force=force,
                        prices=list(prices), prices_file=prices_file, p99_ms=p99_ms,
                        target_rate=target_rate, headroom=headroom,
                        command=_command_line("report", *latency_files))
    for warning in result.warnings:
        _log(f"warning: {warning}")
    if as_json:
        emit_json({"recommendation": result.recommendation.to_dict(),
                   "costs": result.costs.to_dict() if result.costs else None})
        return
    best = result.recommendation.fastest_batch1
    if best:
        click.echo(f"fastest verified at batch 1: {best.backend} {best.precision} on "
                   f"{best.machine} (p50 {best.p50_ms:.2f} ms)")
    if result.costs is not None:
        for line in render.cost_answer(result.costs):
            click.echo(line)
    _log(f"wrote {', '.join(str(path) for path in result.files)}")


# ----------------------------------------------------------------------------- deploy
@cli.group()
def deploy() -> None:
    """Package a bundle for a serving system.

    \b
    Example:
      python -m pipeline deploy triton exported/resnet18 --out model_repository
    """


def _repository_options(out_help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """BUNDLE, --out and what the Triton repository serves: deploy triton's and kubernetes'."""
    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed([
                click.argument("bundle", type=click.Path(path_type=Path)),
                click.option("--out", type=click.Path(path_type=Path), required=True, help=out_help),
                click.option("--name", default=None, help="Model name in the repository (default: "
                                                          "the arch)."),
                click.option("--target", type=click.Choice(TRITON_TARGETS), default=TRITON.target,
                             show_default=True, help="cpu: KIND_CPU instances, fp32. gpu: KIND_GPU "
                                                     "with the TensorRT accelerator."),
                click.option("--precision", type=click.Choice(TRITON_GPU_PRECISIONS),
                             default=TRITON.precision,
                             help="TensorRT precision for --target gpu (default fp16; int8 serves "
                                  "model.int8.onnx).")]):
            command = option(command)
        return command
    return wrap


@deploy.command("triton")
@_repository_options("The model repository folder to write (tritonserver --model-repository).")
@click.option("--max-batch-size", type=int, default=TRITON.max_batch_size, show_default=True,
              help="Triton's max_batch_size (the ONNX batch axis is dynamic).")
@click.option("--instances", type=int, default=TRITON.instances, show_default=True,
              help="instance_group count.")
@click.option("--threads", type=int, default=TRITON.threads,
              help="ONNX Runtime's intra-op threads per instance [default: ORT's, all cores].")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON only.")
def deploy_triton(bundle: Path, out: Path, name: str | None, target: str, precision: str | None,
                  max_batch_size: int, instances: int, threads: int | None, as_json: bool) -> None:
    """Write a Triton model repository (ONNX Runtime backend) for the bundle.

    Preferred batch sizes for dynamic batching come from the bundle's bench sweep, if any.

    \b
    Example:
      python -m pipeline deploy triton exported/resnet18 --out model_repository
      python -m pipeline deploy triton exported/resnet18 --out repo --target gpu --precision int8
    """
    written = api.deploy_triton(bundle, out, name=name, target=target, precision=precision,
                                max_batch_size=max_batch_size, instances=instances,
                                threads=threads).record
    if as_json:
        emit_json(written.to_dict())
    else:
        click.echo(f"wrote {written.config} ({written.target}, {written.onnx}, "
                   f"max_batch_size {written.max_batch_size}, preferred batch sizes "
                   f"{written.preferred_batch_size or 'none (run bench for them)'})")
        click.echo(f"start it with: tritonserver --model-repository {written.repository}")


@deploy.command("kubernetes")
@_repository_options("The folder to write: model_repository/, Dockerfile, the manifest, README.md.")
@click.option("--latency", type=click.Path(path_type=Path), default=None,
              help="The latency.json that sizes the pods [default: the bundle's].")
@click.option("--replicas", type=int, default=None, help="A fixed replica count (no autoscaler).")
@click.option("--target-rate", default=None, metavar="'R images/s' | 'R requests/s'",
              help="Size the replicas for this load within --p99-ms, from the measured capacity "
                   "(as report --target-rate does).")
@click.option("--p99-ms", type=float, default=None, help="The p99 bound --target-rate is sized for.")
@click.option("--headroom", type=float, default=HEADROOM, show_default=True,
              help="The share of its capacity each replica carries; also the autoscaler's CPU "
                   "utilization target.")
@click.option("--max-replicas", type=int, default=None,
              help="The autoscaler's ceiling [default: twice the sized count, or 4].")
@click.option("--kserve", is_flag=True, help="A KServe InferenceService (Triton runtime) instead "
                                             "of the Deployment and Service.")
@click.option("--model-image", default=None, metavar="IMAGE",
              help="The image that carries the repository [default: NAME-model-repository:SHA, "
                   "a local name; give your registry's].")
@click.option("--storage-uri", default=None,
              help="--kserve: where KServe fetches the repository [default: oci://MODEL_IMAGE].")
@click.option("--namespace", default=None, help="The namespace to put in the manifests.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON only.")
def deploy_kubernetes(bundle: Path, out: Path, name: str | None, target: str,
                      precision: str | None, latency: Path | None, replicas: int | None,
                      target_rate: str | None, p99_ms: float | None, headroom: float,
                      max_replicas: int | None, kserve: bool, model_image: str | None,
                      storage_uri: str | None, namespace: str | None, as_json: bool) -> None:
    """Triton on Kubernetes: the repository, an image that carries it, and the manifests
    (Deployment, Service, autoscaler; or a KServe InferenceService), sized from bench.

    \b
    Example:
      python -m pipeline deploy kubernetes exported/resnet18 --out k8s/
      python -m pipeline deploy kubernetes exported/resnet18 --out k8s/ --target-rate '400 images/s' --p99-ms 100
      python -m pipeline deploy kubernetes exported/resnet18 --out k8s/ --kserve --replicas 2
    """
    written = api.deploy_kubernetes(
        bundle, out, name=name, target=target, precision=precision, latency=latency,
        replicas=replicas, target_rate=target_rate, p99_ms=p99_ms, headroom=headroom,
        max_replicas=max_replicas, kserve=kserve, model_image=model_image,
        storage_uri=storage_uri, namespace=namespace).record
    if as_json:
        emit_json(written.to_dict())
        return
    click.echo(written.summary)
    for path in written.files:
        _log(f"wrote {path}")
    click.echo(f"then: docker build -t {written.model_image} {written.out} && kubectl apply -f "
               f"{written.manifests[0]}")


# ----------------------------------------------------------------------------- serve
@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default=SERVE.host, show_default=True,
              help="Address for HTTP, gRPC and metrics. 0.0.0.0 exposes the server to the network.")
@click.option("--port", type=int, default=SERVE.port, show_default=True, help="HTTP port.")
@click.option("--grpc-port", type=int, default=SERVE.grpc_port, show_default=True, help="gRPC port.")
@click.option("--metrics-port", type=int, default=SERVE.metrics_port, show_default=True,
              help="Prometheus metrics port.")
@click.option("--max-batch-size", type=int, default=SERVE.max_batch_size, show_default=True,
              help="Largest batch the dynamic batcher forms.")
@click.option("--queue-delay-us", type=int, default=SERVE.queue_delay_us, show_default=True,
              help="How long a request may wait for others to batch with.")
@click.option("--instances", type=int, default=SERVE.instances, show_default=True,
              help="Model instances.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime threads per instance.")
@click.option("--precision", type=click.Choice(["fp32", "int8", "fp16"]), default=SERVE.precision,
              show_default=True, help="The bundle's variant to serve.")
@click.option("--max-request-mb", type=float, default=None,
              help="Refuse request bodies (HTTP) and messages (gRPC) larger than this, unread. "
                   "Default: the largest batch as binary tensors plus 1 MiB.")
def serve(bundle: Path, host: str, port: int, grpc_port: int, metrics_port: int,
          max_batch_size: int, queue_delay_us: int, instances: int, threads: int | None,
          precision: str, max_request_mb: float | None) -> None:
    """Serve the bundle with NVIDIA Triton (through PyTriton): HTTP and gRPC, dynamic batching,
    health and readiness. Stops cleanly on SIGTERM or Ctrl-C. Needs the serving extra.

    \b
    Example:
      python -m pipeline serve exported/resnet18
      python -m pipeline serve exported/resnet18 --port 9000 --max-batch-size 16
      python -m pipeline predict exported/resnet18 photo.jpg --server http://127.0.0.1:8000
    """

    def ready(info: Endpoints) -> None:
        _log(f"serving {info.model} ({info.model_file}): {info.model_url}")
        _log(f"  infer    POST {info.infer}  input {info.input} FP32 "
             f"[batch, {', '.join(map(str, info.input_shape))}]")
        _log(f"  ready    GET  {info.ready}")
        _log(f"  grpc     {info.grpc}   metrics {info.metrics}")
        _log(f"  requests over {info.max_request_bytes / (1 << 20):.1f} MiB are refused "
             f"(--max-request-mb)")
        _log("stop with Ctrl-C or SIGTERM")

    api.serve(bundle, host=host, port=port, grpc_port=grpc_port, metrics_port=metrics_port,
              max_batch_size=max_batch_size, queue_delay_us=queue_delay_us, instances=instances,
              threads=threads, precision=precision, max_request_mb=max_request_mb,
              on_ready=ready)
    _log("stopped")


# ----------------------------------------------------------------------------- predict
@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=int, default=PREDICT.top_k, show_default=True, help="How many classes to show.")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default=PREDICT.provider, show_default=True,
              help="ONNX Runtime execution provider; cuda fails (exit 3) rather than fall back.")
@click.option("--runtime", type=click.Choice(sorted({b.runtime for b in predict_backends()})),
              default=None,
              help="ONNX Runtime, OpenVINO (the openvino extra), or PyTorch on the bundle's "
                   "model.pt2 (a .pt2 file always runs in PyTorch). Default: ort, or what "
                   "--precision auto picks.")
@click.option("--precision", type=click.Choice(PREDICT_PRECISIONS), default=PREDICT.precision,
              show_default=True,
              help="auto: the fastest (backend, precision) whose accuracy gate passed for this "
                   "bundle on this CPU (else fp32); or a bundle's variant: fp32, int8, fp16.")
@click.option("--batch-size", "batch", type=int, default=PREDICT.batch, show_default=True,
              help="Most images per inference call (batches form as images are decoded).")
@click.option("--workers", type=int, default=None,
              help="Decode processes (0: decode here). Default: a measured split of the cores.")
@click.option("--threads", type=int, default=None,
              help="Runtime threads. Default: a measured split of the cores.")
@click.option("--max-wait-ms", type=float, default=PREDICT.max_wait_ms, show_default=True,
              help="Longest a started batch waits for the next decoded image.")
@click.option("--fast-decode", is_flag=True,
              help="Let libjpeg decode large JPEGs at a reduced scale (faster; pixels differ "
                   "slightly: see benchmarks/results/offline.md).")
@click.option("--output", "-o", default=None,
              help="Write predictions to FILE as they come: .jsonl (one JSON object per line) "
                   "or .csv, by suffix. Default: stdout.")
@click.option("--resume", is_flag=True, help="Skip files already in --output and append the rest.")
@click.option("--server", default=None,
              help="Classify through the Triton server at this URL (python -m pipeline serve BUNDLE), "
                   "preprocessing and labelling with the bundle given.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run as a Ray Data pipeline (the ray extra): decode in Ray tasks, infer in an "
                   "actor pool. A local Ray unless --ray-address is given.")
@click.option("--ray-address", default=None,
              help="A Ray cluster to run on (ray://HEAD:10001, or auto); implies --ray.")
@click.option("--json", "as_json", is_flag=True, help="Print predictions on stdout as one JSON array.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no choice or summary lines.")
@click.pass_context
def predict(ctx: click.Context, model: Path, images: tuple[Path, ...], top_k: int, provider: str,
            runtime: str | None, precision: str, batch: int, workers: int | None,
            threads: int | None, max_wait_ms: float, fast_decode: bool, output: str | None,
            resume: bool, server: str | None, use_ray: bool, ray_address: str | None,
            as_json: bool, quiet: bool) -> None:
    """Classify images with an exported bundle, a bare .onnx or a bare model.pt2.

    Files and folders (walked in sorted order) stream through decode worker processes into
    batches; predictions come out in input order as they are ready: on stdout, or appended to
    --output. Bad files are error lines in their place. Ctrl-C stops cleanly (exit 130) and
    leaves a valid, partial --output that --resume continues.

    Exit 1 if any file could not be classified (the others still are).

    \b
    Example:
      python -m pipeline predict exported/resnet18 photo.jpg more/ --top-k 5
      python -m pipeline predict exported/resnet18 photos/ --output labels.jsonl
      python -m pipeline predict exported/resnet18 photos/ --output labels.csv --resume
      python -m pipeline predict model.onnx photo.jpg --provider cuda --json
      python -m pipeline predict exported/resnet18/model.pt2 photo.jpg
      python -m pipeline predict exported/resnet18 photo.jpg --server http://127.0.0.1:8000
      python -m pipeline predict exported/resnet18 photos/ --precision int8 --runtime openvino
      python -m pipeline predict exported/resnet18 photos/ --ray --output labels.jsonl
    """
    from pipeline.stages.predict import as_record

    first = [True]

    def emit(prediction: Any) -> None:
        if prediction.error:
            _log(f"error: {prediction.error}")
        if as_json:
            click.echo(("[" if first[0] else ",") + json.dumps(as_record(prediction)))
            first[0] = False
        elif output is None and not prediction.error:
            best = ", ".join(f"{t.label} {t.probability:.3f}" for t in prediction.top)
            click.echo(f"{prediction.file}: {best}")

    try:
        summary = api.classify(model, list(images), output=output, resume=resume, top_k=top_k,
                               provider=provider, runtime=runtime, precision=precision,
                               batch_size=batch, workers=workers, threads=threads,
                               max_wait_ms=max_wait_ms, fast_decode=fast_decode, server=server,
                               emit=emit, log=(lambda _: None) if quiet else _log,
                               progress=False if quiet else None,
                               ray=ray_address or use_ray)
    except KeyboardInterrupt:
        if as_json:
            click.echo("[]" if first[0] else "]")
        where = f"; {output} holds whole lines only: add --resume to continue" if output else ""
        _log(f"interrupted{where}")
        ctx.exit(EXIT_INTERRUPTED)
    if as_json:
        click.echo("[]" if first[0] else "]")
    if summary.errors:
        ctx.exit(EXIT_CHECK_FAILED)


def main() -> None:
    cli(prog_name="python -m pipeline")


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
