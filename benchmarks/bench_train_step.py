"""What one training epoch of ``python -m pipeline run`` costs on this CPU, per choice.

``run`` trains resnet18 on the synthetic shapes (1600 training images, 64 px). This times a
whole training epoch, data loading included, for each setting, interleaved round by round so
that the machine's drift hits every setting alike, and prints the median and range:

- memory format: contiguous (NCHW) or ``channels_last`` (NHWC, oneDNN's native CPU layout);
- data-loader workers: 0 (decode in the training process) or 2 (two worker processes);
- batch size: 16 (run's default) or 32.

    python benchmarks/bench_train_step.py --rounds 3 --out benchmarks/results/train-step-cpu.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from pathlib import Path

import torch

from pipeline.core.machine import cpu_summary
from pipeline.data.datasets import load_data
from pipeline.models.archs import get_arch
from pipeline.models.weights import load_model
from pipeline.stages.train import Dist, make_loader


def epoch_seconds(data, *, channels_last: bool, workers: int, batch: int, seed: int = 0) -> float:
    loaded = load_model("resnet18", num_classes=4, weights="random", class_names=data.class_names,
                        input_size=64, seed=seed)
    model = loaded.model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    criterion = torch.nn.CrossEntropyLoss()
    loader = make_loader(data.train, batch, train=True, workers=workers, seed=seed, epoch=0,
                         ctx=Dist(), pin=False)
    started = time.perf_counter()
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    spec = get_arch("resnet18")
    data = load_data("synthetic", spec.preprocessing(64), cifar_aug=False)
    settings = list(itertools.product((False, True), (0, 2), (16, 32)))
    times: dict[tuple[bool, int, int], list[float]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for setting in settings:
            cl, workers, batch = setting
            times[setting].append(epoch_seconds(data, channels_last=cl, workers=workers, batch=batch))
            print(setting, f"{times[setting][-1]:.1f}s", flush=True)
    base = statistics.median(times[(False, 2, 16)])
    lines = ["# One training epoch of `run` (resnet18, 1600 synthetic images, 64 px, AdamW)", "",
             f"Command: `python benchmarks/bench_train_step.py --rounds {args.rounds}`", "",
             f"Machine: {cpu_summary()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} intra-op threads. Settings interleaved round by round.", "",
             "| memory format | loader workers | batch | median s/epoch | min | max | vs contiguous, 2 workers, batch 16 |",
             "|---|---|---|---|---|---|---|"]
    for (cl, workers, batch), values in times.items():
        median = statistics.median(values)
        lines.append(f"| {'channels_last' if cl else 'contiguous'} | {workers} | {batch} | "
                     f"{median:.1f} | {min(values):.1f} | {max(values):.1f} | {base / median:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
