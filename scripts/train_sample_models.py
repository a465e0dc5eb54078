#!/usr/bin/env python
"""Train the sample MNIST models from scratch and export them to ONNX.

    .venv/bin/python scripts/train_sample_models.py [--model lenet-300-100|lenet5|all] [--out sample_models]

Needs the torch extra and the MNIST cache (``weightless data fetch mnist``). Runs on the
CPU with a fixed seed, deterministic kernels and a fixed thread count, so the same torch
build reproduces the same weights. Each model trains for a fixed number of epochs and the
last epoch's weights are exported: the test set is only measured, never used to choose.

The exported graphs take ``input`` [N,1,28,28] float32 pixels in [0,1] (the Caffe LeNet
scaling, so no normalisation is needed) and return ``logits`` [N,10]. Layers are named
``conv1``/``fc1``... so initializers read ``fc1.weight``, ``conv1.bias`` and so on.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional

from weightless_cli.data import load_mnist
from weightless_cli.fileio import write_bytes_atomic

OPSET = 17
SEED = 20180710  # ICML 2018, the Weightless paper's conference
THREADS = 2


class LeNet300100(nn.Module):
    """The 784-300-100-10 ReLU MLP of LeCun et al. 1998 / Deep Compression (266,610 params)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = functional.relu(self.fc1(x))
        x = functional.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """Caffe's LeNet-5 (431,080 params): no non-linearity after the convolutions, as in Caffe."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = functional.max_pool2d(self.conv1(x), 2)
        x = functional.max_pool2d(self.conv2(x), 2)
        x = torch.flatten(x, 1)
        x = functional.relu(self.fc1(x))
        return self.fc2(x)


@dataclass(frozen=True)
class Recipe:
    """How one model is trained: SGD with Nesterov momentum and a one-cycle learning rate."""

    build: Callable[[], nn.Module]
    epochs: int
    batch_size: int
    peak_lr: float
    weight_decay: float
    max_shift: int  # random translation of up to this many pixels (0 = no augmentation)


RECIPES = {
    "lenet-300-100": Recipe(
        LeNet300100, epochs=30, batch_size=128, peak_lr=0.1, weight_decay=1e-4, max_shift=0
    ),
    "lenet5": Recipe(LeNet5, epochs=15, batch_size=128, peak_lr=0.05, weight_decay=5e-4, max_shift=0),
}


def make_deterministic(threads: int) -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def mnist_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist(split)
    x = torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def random_shift(batch: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random whole-pixel offset, filling with zeros."""
    if max_shift == 0:
        return batch
    n, _, height, width = batch.shape
    padded = functional.pad(batch, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n, 1, 1), generator=generator)
    rows = dy + torch.arange(height).view(1, height, 1)
    cols = dx + torch.arange(width).view(1, 1, width)
    return padded[torch.arange(n).view(n, 1, 1), 0, rows, cols].unsqueeze(1)


def one_cycle_lr(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 15 % of steps, then cosine decay to zero."""
    warmup = max(1, int(0.15 * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(2000)])
    return float((predictions == y).float().mean())


def train(name: str, recipe: Recipe, log: Callable[[str], None]) -> nn.Module:
    x_train, y_train = mnist_tensors("train")
    x_test, y_test = mnist_tensors("test")
    torch.manual_seed(SEED)
    model = recipe.build()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.0, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay
    )
    generator = torch.Generator().manual_seed(SEED)
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    step = 0
    for epoch in range(recipe.epochs):
        started = time.monotonic()
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        running_loss = 0.0
        for batch_indices in order.split(recipe.batch_size):
            for group in optimizer.param_groups:
                group["lr"] = one_cycle_lr(step, total_steps, recipe.peak_lr)
            batch = random_shift(x_train[batch_indices], recipe.max_shift, generator)
            loss = functional.cross_entropy(model(batch), y_train[batch_indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * len(batch_indices)
            step += 1
        test_error = 100.0 * (1.0 - accuracy(model, x_test, y_test))
        log(
            f"{name} epoch {epoch + 1}/{recipe.epochs}: loss {running_loss / len(x_train):.4f}, "
            f"test error {test_error:.2f} % ({time.monotonic() - started:.0f} s)"
        )
    model.eval()
    return model


def export_onnx(model: nn.Module, path: Path, extra_initializers: tuple[str, ...] = ()) -> None:
    """Export with the TorchScript exporter (simple Gemm/Conv graphs), inline weights, dynamic batch."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch >= 2.9 warns that this exporter is the legacy one; its plain graphs are why we use it.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, 1, 28, 28),),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            do_constant_folding=True,
            export_params=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    check_clean_graph(proto, extra_initializers)
    write_bytes_atomic(path, proto.SerializeToString())


def check_clean_graph(proto: onnx.ModelProto, extra_initializers: tuple[str, ...] = ()) -> None:
    """Refuse an export that is not what every later stage expects of a sample model."""
    onnx.checker.check_model(proto, full_check=True)
    graph = proto.graph
    initializer_names = {t.name for t in graph.initializer}
    data_inputs = [i.name for i in graph.input if i.name not in initializer_names]
    if data_inputs != ["input"] or [o.name for o in graph.output] != ["logits"]:
        raise SystemExit(
            f"unexpected graph inputs/outputs: {data_inputs} -> {[o.name for o in graph.output]}"
        )
    training_ops = {"Dropout", "BatchNormalization"} & {node.op_type for node in graph.node}
    if training_ops:
        raise SystemExit(f"training-only ops left in the graph: {sorted(training_ops)}")
    unnamed = [
        name
        for name in initializer_names
        if not name.endswith((".weight", ".bias")) and name not in extra_initializers
    ]
    if unnamed:
        raise SystemExit(f"initializers without a layer name: {sorted(unnamed)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=[*RECIPES, "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "sample_models")
    parser.add_argument("--threads", type=int, default=THREADS, help="CPU threads (results depend on it)")
    parser.add_argument("--epochs", type=int, help="override the recipe's epoch count (for quick trials)")
    args = parser.parse_args(argv)
    make_deterministic(args.threads)
    names = list(RECIPES) if args.model == "all" else [args.model]
    for name in names:
        recipe = RECIPES[name]
        if args.epochs is not None:
            recipe = Recipe(**{**recipe.__dict__, "epochs": args.epochs})
        model = train(name, recipe, lambda line: print(line, flush=True))
        path = args.out / f"{name}.onnx"
        export_onnx(model, path)
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
