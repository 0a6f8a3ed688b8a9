"""``python -m pipeline``: one thin click command per stage.

The library does the work; commands parse options, call it, print, and choose the exit code:
0 ok, 1 a check failed, 2 usage or input error, 3 environment error. Nothing heavy (torch,
onnx, onnxruntime) is imported at module load, so ``--help`` answers at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from pipeline import __version__
from pipeline.errors import EXIT_CHECK_FAILED, PipelineError

DEFAULT_BUNDLE_ROOT = Path("exported")


class PipelineGroup(click.Group):
    """Turns user-facing errors into one ``error:`` line and their exit code, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


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
    from pipeline.archs import ARCHS, describe

    rows = [describe(spec) for spec in ARCHS.values()]
    if as_json:
        emit_json(rows)
        return
    click.echo(f"{'arch':<16} {'params':>8} {'GMACs':>7} {'input':>5}  preprocessing")
    for row in rows:
        prep = row["preprocessing"]
        click.echo(f"{row['arch']:<16} {row['params'] / 1e6:7.2f}M {row['gmacs']:7.3f} "
                   f"{row['input_size']:>5}  resize {prep['resize']}, crop {prep['crop']}, "
                   f"mean {_triple(prep['mean'])}, std {_triple(prep['std'])}")


def _triple(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


# ----------------------------------------------------------------------------- model options
def model_options(func: Any) -> Any:
    """Options that choose an architecture and its weights (export, train)."""
    options = [
        click.option("--arch", default=None, help="Architecture (see `archs`). Default resnet18, "
                     "or the checkpoint's arch."),
        click.option("--num-classes", type=int, default=None,
                     help="Output classes (default 1000 ImageNet archs, 10 CIFAR archs)."),
        click.option("--weights", default="random", show_default=True,
                     help="random (fixed seed) or imagenet (torchvision's pretrained weights)."),
        click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
                     help="A state dict or a training checkpoint to load."),
        click.option("--class-names", default=None, help="Comma-separated class names."),
        click.option("--input-size", type=int, default=None,
                     help="Override the input size; preprocessing follows."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed for random initialisation."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def tolerance_options(func: Any) -> Any:
    from pipeline.verify import DEFAULT_ATOL, DEFAULT_RTOL

    func = click.option("--rtol", type=float, default=DEFAULT_RTOL, show_default=True,
                        help="Relative tolerance.")(func)
    return click.option("--atol", type=float, default=DEFAULT_ATOL, show_default=True,
                        help="Absolute tolerance.")(func)


# ----------------------------------------------------------------------------- export
@cli.command()
@model_options
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Bundle directory (default exported/<arch>).")
@click.option("--exporter", type=click.Choice(["dynamo", "legacy"]), default="dynamo",
              show_default=True, help="torch.onnx exporter: dynamo (torch.export) or legacy (TorchScript).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Also verify on these real images.")
@tolerance_options
@click.option("--verbose", "-v", is_flag=True, help="Show exporter output instead of capturing it.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and parity as JSON.")
@click.pass_context
def export(ctx: click.Context, arch: str | None, num_classes: int | None, weights: str,
           checkpoint: Path | None, class_names: str | None, input_size: int | None, seed: int,
           out: Path | None, exporter: str, opset: int, no_simplify: bool, images: Path | None,
           atol: float, rtol: float, verbose: bool, as_json: bool) -> None:
    """Export to TorchScript and ONNX, simplify, then verify parity.

    \b
    Example:
      python -m pipeline export --arch resnet18
      python -m pipeline export --arch resnet50 --weights imagenet --opset 17 --exporter legacy
      python -m pipeline export --checkpoint exported/resnet18/checkpoint.pt
    """
    from pipeline.console import StageTimer
    from pipeline.export import ExportOptions, check_options, export_bundle
    from pipeline.weights import load_model, parse_class_names

    options = ExportOptions(exporter=exporter, opset=opset, simplify=not no_simplify, verbose=verbose)
    check_options(options)
    timer = StageTimer()
    with timer.stage("load") as step:
        loaded = load_model(arch, num_classes=num_classes, weights=weights, checkpoint=checkpoint,
                            class_names=parse_class_names(class_names), input_size=input_size,
                            seed=seed)
        step["text"] = (f"{loaded.arch}, {loaded.num_classes} classes, "
                        f"{loaded.preprocessing.crop}px, weights {loaded.weights['source']}")
    bundle_dir = out or DEFAULT_BUNDLE_ROOT / loaded.arch
    _log(f"exporting {loaded.arch} to {bundle_dir}/")
    bundle = export_bundle(loaded, bundle_dir, options, timer)
    with timer.stage("verify") as step:
        report = _verify(bundle.root, atol=atol, rtol=rtol, images=images)
        step["text"] = f"{'passed' if report else 'FAILED'} ({len(report.pairs)} comparisons)"
    _finish_verify(ctx, report, as_json, extra={"bundle": str(bundle.root),
                                                "manifest": bundle.read_manifest()})


def _verify(bundle: Path, **kwargs: Any) -> Any:
    from pipeline.verify import verify_bundle

    return verify_bundle(bundle, **kwargs)


def _finish_verify(ctx: click.Context, report: Any, as_json: bool,
                   extra: dict[str, Any] | None = None) -> None:
    from pipeline.verify import failure_summary, format_table

    if as_json:
        emit_json({**(extra or {}), "parity": report.to_dict()})
    else:
        click.echo(format_table(report))
    if not report:
        _log(f"error: {failure_summary(report)}")
        ctx.exit(EXIT_CHECK_FAILED)


# ----------------------------------------------------------------------------- verify
@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Also compare on real images, preprocessed by the bundle's own spec.")
@tolerance_options
@click.option("--cpu-only", is_flag=True, help="Do not try the CUDA execution provider.")
@click.option("--json", "as_json", is_flag=True, help="Print parity JSON only on stdout.")
@click.pass_context
def verify(ctx: click.Context, bundle: Path, images: Path | None, atol: float, rtol: float,
           cpu_only: bool, as_json: bool) -> None:
    """Check artifact hashes, then parity of every exported model vs PyTorch.

    Exit 1 when a file changed or any pair exceeds the tolerances (a CI gate).

    \b
    Example:
      python -m pipeline verify exported/resnet18
      python -m pipeline verify exported/resnet18 --images photos/ --atol 1e-4 --rtol 1e-3
    """
    report = _verify(bundle, atol=atol, rtol=rtol, images=images, with_cuda=not cpu_only)
    _finish_verify(ctx, report, as_json)


def main() -> None:
    cli(prog_name="python -m pipeline")


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
