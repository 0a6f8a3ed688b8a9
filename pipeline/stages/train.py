"""train_one_epoch / evaluate / fit -> checkpoint, history, metrics, plot.

Runs on one process or under ``torchrun`` (DistributedDataParallel: NCCL on GPUs, gloo on
CPU, a DistributedSampler, metrics reduced across ranks, files written by rank 0 only).
Every epoch is seeded from ``seed + epoch``, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from pipeline.core.bundle import (
    CHECKPOINT,
    HISTORY,
    HISTORY_PLOT,
    LAST_CHECKPOINT,
    METRICS,
    TRAIN_FILES,
    Bundle,
    ensure_writable_dir,
    save_atomic,
    write_json_atomic,
)
from pipeline.core.records import EpochRow, TrainSummary
from pipeline.data.datasets import load_data
from pipeline.errors import EnvironmentUnavailable, InputError
from pipeline.models.archs import get_arch
from pipeline.models.weights import (
    TRAIN_CHECKPOINT_FORMAT,
    Checkpoint,
    load_model,
    read_checkpoint,
)
from pipeline.options import MODEL, OPTIMIZERS, ModelOptions, TrainOptions

if TYPE_CHECKING:
    import torch
    from torch import nn


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group when launched by torchrun; a no-op otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(values: "torch.Tensor", ctx: Dist) -> "torch.Tensor":
    import torch.distributed as dist

    if not ctx.enabled:
        return values
    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        on_gpu = values.cuda()
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        return on_gpu.cpu()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


# ----------------------------------------------------------------------------- building blocks
def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise EnvironmentUnavailable("--device cuda: no CUDA GPU visible (torch.cuda.is_available() is False)")
    if requested not in ("cpu", "cuda"):
        raise InputError(f"unknown --device {requested!r}; choose from: auto, cpu, cuda")
    return requested


def build_optimizer(name: str, params: Any, lr: float, *, momentum: float, weight_decay: float) -> "torch.optim.Optimizer":
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise InputError(f"unknown optimizer {name!r}; choose from: {', '.join(OPTIMIZERS)}")


def build_scheduler(name: str, optimizer: "torch.optim.Optimizer", epochs: int,
                    steps_per_epoch: int) -> Any:
    """The learning-rate schedule; ``onecycle`` is stepped after each of the ``steps_per_epoch``
    batches of an epoch, the others once an epoch."""
    from torch.optim import lr_scheduler

    if name == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if name == "onecycle":
        # Smith's one cycle: warm up to the rate for the first 30% of the steps, then anneal
        # (cosine) to 1/10000 of it. On run's synthetic shapes it did not converge sooner
        # than cosine (benchmarks/results/run-epochs.md); elsewhere it often does.
        rate = optimizer.param_groups[0]["lr"]
        return lr_scheduler.OneCycleLR(optimizer, max_lr=rate, epochs=epochs,
                                       steps_per_epoch=max(1, steps_per_epoch))
    if name == "step":
        return lr_scheduler.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1)
    if name == "plateau":
        # as in the CIFAR-10 write-up: halve the rate when validation loss stalls
        return lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=0.5, patience=2, min_lr=1e-6)
    return None


def freeze_backbone(model: "nn.Module") -> None:
    """Train the classifier head only."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("fc.")


def make_loader(dataset: Any, batch_size: int, *, train: bool, workers: int, seed: int,
                epoch: int, ctx: Dist, pin: bool) -> "torch.utils.data.DataLoader":
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    generator = torch.Generator().manual_seed(seed + epoch)
    sampler = None
    if ctx.enabled:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank,
                                     shuffle=train, seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train and sampler is None,
                      sampler=sampler, num_workers=workers, generator=generator, pin_memory=pin,
                      drop_last=train and len(dataset) > batch_size * ctx.world,
                      persistent_workers=False)


# ----------------------------------------------------------------------------- epochs
def train_one_epoch(model: "nn.Module", loader: Any, criterion: Any, optimizer: Any, *,
                    device: str, scaler: Any, ctx: Dist, progress: bool, epoch: int,
                    epochs: int, after_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One pass over ``loader``; ``after_step`` runs after each optimizer step (a per-batch
    learning-rate schedule)."""
    import torch
    from tqdm import tqdm

    model.train()
    sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
    channels_last = device == "cuda"
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
               disable=None if progress and ctx.is_main else True, file=sys.stderr)  # None: off when not a TTY
    for images, labels in bar:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device_type=device, dtype=torch.float16, enabled=scaler is not None):
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if after_step is not None:
            after_step()
        count = labels.numel()
        sums += torch.tensor([loss.item() * count, (logits.argmax(1) == labels).sum().item(), count],
                             dtype=torch.float64)
        bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}")
    sums = all_reduce_sum(sums, ctx)
    return {"loss": float(sums[0] / sums[2]), "acc": float(sums[1] / sums[2])}


@dataclass
class Validation:
    """One pass over the validation split: loss, top-1, and the confusion matrix."""

    loss: float
    acc: float
    confusion: list[list[int]]  # rows: true class, columns: predicted


def evaluate(model: "nn.Module", loader: Any, criterion: Any, *, device: str, num_classes: int,
             ctx: Dist) -> Validation:
    """Loss, top-1 and the confusion matrix (rows: true class, columns: predicted)."""
    import torch

    model.eval()
    sums = torch.zeros(2, dtype=torch.float64)  # loss * n, n
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    with torch.inference_mode():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            sums += torch.tensor([criterion(logits, labels).item() * labels.numel(), labels.numel()],
                                 dtype=torch.float64)
            index = labels.cpu() * num_classes + logits.argmax(1).cpu()
            confusion += torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)
    sums = all_reduce_sum(sums, ctx)
    confusion = all_reduce_sum(confusion, ctx)
    correct = float(confusion.diag().sum())
    return Validation(float(sums[0] / sums[1]), correct / float(sums[1]), confusion.long().tolist())


def per_class_accuracy(confusion: list[list[int]], names: list[str]) -> dict[str, float | None]:
    return {name: (row[index] / sum(row) if sum(row) else None)
            for index, (name, row) in enumerate(zip(names, confusion))}


def state_digest(model: "nn.Module") -> str:
    """sha256 of every parameter and buffer: equal digests mean identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def plot_history(history: list[EpochRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row.epoch for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        axes[0].plot(epochs, [getattr(row, key) for row in history], marker="o", label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "val")):
        axes[1].plot(epochs, [getattr(row, key) for row in history], marker="o", label=label)
    axes[2].plot(epochs, [row.lr for row in history], marker="o", color="tab:green")
    for axis, title in zip(axes, ("loss", "accuracy", "learning rate")):
        axis.set_title(title)
        axis.set_xlabel("epoch")
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    save_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------- fit
def read_resume(path: str, arch: str | None) -> Checkpoint:
    state = read_checkpoint(path)
    if not state.resumable:
        raise InputError(f"--resume {path!r} is not a training checkpoint with optimizer state; "
                         f"resume from last.pt written by python -m pipeline train")
    if arch and state.arch != arch:
        raise InputError(f"--resume {path!r} is a checkpoint of arch {state.arch!r}, not "
                         f"{arch!r}; drop --arch or resume from a matching checkpoint")
    return state


@dataclass
class TrainingRun:
    """Everything one training run holds between epochs."""

    config: TrainOptions
    ctx: Dist
    device: str
    data: Any
    loaded: Any
    net: Any
    optimizer: Any
    scheduler: Any
    criterion: Any
    scaler: Any
    bundle: Bundle
    batch_size: int
    epoch: int = 0
    best_acc: float = -1.0
    history: list[EpochRow] = field(default_factory=list)

    @property
    def model(self) -> "nn.Module":
        return self.loaded.model

    def checkpoint(self) -> Checkpoint:
        loaded = self.loaded
        return Checkpoint(format=TRAIN_CHECKPOINT_FORMAT, state_dict=self.model.state_dict(),
                          arch=loaded.arch, num_classes=loaded.num_classes,
                          class_names=loaded.class_names, preprocessing=loaded.preprocessing,
                          optimizer=self.optimizer.state_dict(),
                          scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
                          epoch=self.epoch, best_acc=self.best_acc, history=list(self.history),
                          config=asdict(self.config), data_source=self.data.source)


def _save(checkpoint: Checkpoint, path: Path) -> None:
    import torch

    save_atomic(path, lambda tmp: torch.save(checkpoint.payload(), tmp))


def _log_epoch(log: Callable[[str], None], row: EpochRow, epochs: int) -> None:
    log(f"epoch {row.epoch}/{epochs}  train loss {row.train_loss:.4f} acc {row.train_acc:.4f}  "
        f"val loss {row.val_loss:.4f} acc {row.val_acc:.4f}  lr {row.lr:.2e}  "
        f"{row.duration_s:.1f}s")


def _input_size(config: TrainOptions, family: str, resume: Checkpoint | None) -> int | None:
    if resume:
        return resume.preprocessing.crop if resume.preprocessing else None
    # The synthetic shapes are drawn at 64 px; 224 would only upsample them.
    return config.input_size or (64 if config.data == "synthetic" and family != "cifar" else None)


def _setup(config: TrainOptions, resume: Checkpoint | None, log: Callable[[str], None]) -> TrainingRun:
    """Device, process group, data, model, optimiser and bundle for one run."""
    import torch
    from torch import nn

    spec = get_arch(resume.arch if resume else config.arch)
    device = pick_device(config.device)
    ctx = init_distributed(device)
    if device == "cuda" and ctx.enabled:
        torch.cuda.set_device(ctx.local_rank)
    prep = spec.preprocessing(_input_size(config, spec.family, resume))
    data = load_data(config.data, prep, cifar_aug=spec.family == "cifar", val_split=config.val_split,
                     seed=config.seed, synthetic_per_class=config.synthetic_per_class, warn=log)
    loaded = load_model(spec.name, num_classes=len(data.class_names), weights=config.weights,
                        class_names=data.class_names, input_size=prep.crop, seed=config.seed)
    if config.freeze_backbone:
        freeze_backbone(loaded.model)
    loaded.model.to(device)
    if device == "cuda":
        loaded.model.to(memory_format=torch.channels_last)
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config.optimizer, trainable, config.learning_rate,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    net = loaded.model
    if ctx.enabled:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[ctx.local_rank] if device == "cuda" else None)
    batch_size = _fit_batch_size(config.batch_size, len(data.train), log)
    steps = len(make_loader(data.train, batch_size, train=True, workers=0, seed=config.seed,
                            epoch=0, ctx=ctx, pin=False))  # batches an epoch, on this rank
    return TrainingRun(config, ctx, device, data, loaded, net, optimizer,
                       build_scheduler(config.schedule, optimizer, config.epochs, steps),
                       nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
                       torch.amp.GradScaler("cuda") if device == "cuda" else None,
                       Bundle(ensure_writable_dir(Path(ModelOptions(out=config.out).bundle_dir(spec.name)))),
                       batch_size)


def _fit_batch_size(batch_size: int, images: int, log: Callable[[str], None]) -> int:
    if batch_size <= images:
        return batch_size
    log(f"warning: --batch-size {batch_size} is larger than the {images} training images; using {images}")
    return images


def _restore(run: TrainingRun, resume: Checkpoint) -> None:
    run.model.load_state_dict(resume.state_dict)
    run.optimizer.load_state_dict(resume.optimizer)
    if run.scheduler is not None and resume.scheduler:
        run.scheduler.load_state_dict(resume.scheduler)
    run.epoch, run.best_acc, run.history = resume.epoch, resume.best_acc, list(resume.history)


def _train_epoch(run: TrainingRun, epoch: int) -> tuple[EpochRow, Validation]:
    """One seeded epoch of training and validation; returns (history row, validation result)."""
    import torch

    config, ctx = run.config, run.ctx
    torch.manual_seed(config.seed + epoch)
    started = time.perf_counter()
    loaders = [make_loader(dataset, run.batch_size, train=train, workers=config.loader_workers,
                           seed=config.seed, epoch=epoch, ctx=ctx, pin=run.device == "cuda")
               for dataset, train in ((run.data.train, True), (run.data.val, False))]
    lr = run.optimizer.param_groups[0]["lr"]
    per_batch = isinstance(run.scheduler, torch.optim.lr_scheduler.OneCycleLR)
    trained = train_one_epoch(run.net, loaders[0], run.criterion, run.optimizer, device=run.device,
                              scaler=run.scaler, ctx=ctx, progress=config.progress, epoch=epoch,
                              epochs=config.epochs,
                              after_step=run.scheduler.step if per_batch else None)
    val = evaluate(run.net, loaders[1], run.criterion, device=run.device,
                   num_classes=len(run.data.class_names), ctx=ctx)
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(val.loss)
    elif run.scheduler is not None and not per_batch:
        run.scheduler.step()
    row = EpochRow(epoch=epoch + 1, train_loss=trained["loss"], train_acc=trained["acc"],
                   val_loss=val.loss, val_acc=val.acc, lr=lr,
                   duration_s=round(time.perf_counter() - started, 3))
    return row, val


def build_config(options: Mapping[str, object], *, resume: str | None = None,
                 defaults: Mapping[str, object] | None = None) -> TrainOptions:
    """A TrainOptions from ``options``, where None means "not given".

    Fresh runs fill what is not given from ``defaults``, then TrainOptions's own defaults.
    Resuming, the interrupted run's own options (stored in last.pt) fill it instead, so
    ``--resume last.pt --epochs 20`` changes the epochs and nothing else.
    """
    known = set(TrainOptions.__dataclass_fields__) - {"resume"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"unknown training option {', '.join(unknown)}; choose from: "
                         f"{', '.join(sorted(known))}")
    given = {key: value for key, value in options.items() if value is not None}
    if resume:
        stored = read_checkpoint(resume).config
        values = {key: value for key, value in stored.items() if key in known}
        values.setdefault("arch", None)  # fit checks it against the checkpoint's own
    else:
        values = {"arch": MODEL.arch, **(defaults or {})}
    values.update(given)
    if values.get("out") is not None:
        values["out"] = str(values["out"])
    return TrainOptions(**values, resume=resume)


def fit(config: TrainOptions, log: Callable[[str], None] | None = None) -> TrainSummary:
    """Train into the bundle ``config.out``; returns a summary with the best validation accuracy."""
    log = log or (lambda message: print(message, file=sys.stderr))
    config.check()
    resume = read_resume(config.resume, config.arch) if config.resume else None
    world_rank = int(os.environ.get("RANK", "0"))
    main_log = log if world_rank == 0 else (lambda message: None)
    run = _setup(config, resume, main_log)
    if resume:
        _restore(run, resume)
        main_log(f"resuming {run.loaded.arch} from {config.resume} at epoch {run.epoch + 1}")
    elif run.ctx.is_main:
        run.bundle.forget_stage(TRAIN_FILES)
    data = run.data
    main_log(f"training {run.loaded.arch} on {data.source}: {len(data.train)} train / {len(data.val)} "
             f"val images, {len(data.class_names)} classes, {run.loaded.preprocessing.crop}px, {run.device}"
             + (f", {run.ctx.world} processes" if run.ctx.enabled else ""))
    last = run.bundle.path(LAST_CHECKPOINT)
    try:
        for epoch in range(run.epoch, config.epochs):
            row, val = _train_epoch(run, epoch)
            # Nothing below may be interrupted half-way: the epoch's state and files change
            # together, or not at all (an interrupt arriving meanwhile waits for the end).
            with deferred_interrupt():
                run.history.append(row)
                run.epoch = epoch + 1
                improved = val.acc > run.best_acc
                run.best_acc = max(run.best_acc, val.acc)
                _log_epoch(main_log, row, config.epochs)
                if run.ctx.is_main:
                    _write_epoch_files(run.bundle, run.checkpoint(), run.history, improved, val,
                                       data.class_names)
    except KeyboardInterrupt:
        # The weights and optimizer are part-way through an epoch; last.pt still holds the
        # last completed epoch, which is exactly where --resume must start again.
        if run.ctx.is_main:
            if last.is_file():
                main_log(f"interrupted during epoch {run.epoch + 1}; {last} keeps epoch "
                         f"{run.epoch}: continue with --resume {last}")
            else:
                main_log("interrupted during epoch 1; no epoch completed, nothing to resume")
        raise
    digest = state_digest(run.model)
    log(f"rank {run.ctx.rank}: final weights sha256 {digest}")
    if run.ctx.is_main:
        _record_training(run.bundle, config, data, run.history, run.best_acc)
        _log_per_class(run.bundle, main_log)
    return TrainSummary(bundle=str(run.bundle.root), arch=run.loaded.arch,
                        best_val_acc=run.best_acc, epochs=len(run.history),
                        classes=data.class_names, weights_sha256=digest, world_size=run.ctx.world,
                        rank=run.ctx.rank, skipped_images=len(data.skipped))


def _log_per_class(bundle: Bundle, log: Callable[[str], None]) -> None:
    """The best epoch's validation accuracy, overall and per class, as the CIFAR-10 write-up prints it."""
    import json

    if not bundle.path(METRICS).is_file():
        log(f"no {METRICS}: no epoch of this run completed")
        return
    metrics = json.loads(bundle.path(METRICS).read_text(encoding="utf-8"))
    total = sum(map(sum, metrics["confusion_matrix"]))
    log(f"Accuracy of the network on the {total} validation images: {100 * metrics['top1']:.2f} % "
        f"(epoch {metrics['epoch']})")
    for name, accuracy in metrics["per_class_accuracy"].items():
        shown = "n/a" if accuracy is None else f"{100 * accuracy:.2f} %"
        log(f"Accuracy of {name:>5s} : {shown}")


def _write_epoch_files(bundle: Bundle, checkpoint: Checkpoint, history: list[EpochRow],
                       improved: bool, val: Validation, names: list[str]) -> None:
    """checkpoint/metrics (when improved) and history first, last.pt last: a last.pt on disk
    means every file of its epoch is there too."""
    if improved:
        _save(checkpoint, bundle.path(CHECKPOINT))
        write_json_atomic(bundle.path(METRICS), {
            "epoch": checkpoint.epoch, "top1": val.acc, "val_loss": val.loss,
            "per_class_accuracy": per_class_accuracy(val.confusion, names),
            "class_names": names, "confusion_matrix": val.confusion,
            "confusion_matrix_axes": "rows: true class, columns: predicted class"})
    write_json_atomic(bundle.path(HISTORY), [row.to_dict() for row in history])
    plot_history(history, bundle.path(HISTORY_PLOT))
    _save(checkpoint, bundle.path(LAST_CHECKPOINT))


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it; elsewhere a no-op."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _record_training(bundle: Bundle, config: TrainOptions, data: Any, history: list[EpochRow],
                     best_acc: float) -> None:
    bundle.record_stage(
        "train", files=TRAIN_FILES, warnings=[f"skipped {s}" for s in data.skipped],
        summary={"duration_s": round(sum(row.duration_s for row in history), 3),
                 "data": data.source, "classes": data.class_names, "epochs": len(history),
                 "best_val_acc": best_acc, "skipped_images": data.skipped, "config": asdict(config)})
