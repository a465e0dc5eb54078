"""Fine-tune a model's float weights in place of the same ONNX graph (the `retrain` stage).

The training core lives in :mod:`weightless_cli.train` (PyTorch, an optional extra); this
wrapper picks the tensors, loads the data, writes the trained values back under the same
names and reports. Pruned zeros, shared values and frozen tensors are kept exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weightless_cli.data.datasets import load_dataset
from weightless_cli.errors import UsageError
from weightless_cli.model import OnnxModel, match_any, model_warnings
from weightless_cli.stages.evaluate import model_input_shape


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    unshare: bool = False
    lr_schedule: str = "constant"  # or "cosine": annealed to zero over the run


def trainable_names(model: OnnxModel, freeze: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(trainable, frozen): every float tensor not quantized, subgraphs' included, split by the --freeze globs."""
    names = [t.name for t in model.weights if not t.quantized]
    frozen = [name for name in names if match_any(name, freeze)]
    return [name for name in names if name not in frozen], frozen


def teacher_logits(teacher: OnnxModel, x: np.ndarray) -> np.ndarray:
    """The teacher's logits on ``x`` (pre-softmax, as the distillation loss reads them)."""
    from weightless_cli.train.retrain import compute_logits

    return compute_logits(teacher.proto, x)


def retrain_model(model: OnnxModel, x: np.ndarray, y: np.ndarray | None, freeze: tuple[str, ...],
                  settings: TrainSettings, teacher_logits: np.ndarray | None = None,
                  progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Retrain ``model`` in place on (x, y); distil from ``teacher_logits`` when given (required when y is None)."""
    from weightless_cli.train.retrain import retrain

    trainable, frozen = trainable_names(model, freeze)
    if not trainable:
        raise UsageError("every tensor is frozen; nothing to retrain", model.path)
    if y is None and teacher_logits is None:
        raise UsageError("the data has no labels: give --teacher MODEL to distil from", model.path)
    result = retrain(model.proto, x, y, trainable=trainable, frozen=frozen, teacher_logits=teacher_logits,
                     epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size, seed=settings.seed,
                     unshare=settings.unshare, lr_schedule=settings.lr_schedule, progress=progress)
    for name, values in result.weights.items():
        model.weight(name).set_array(values)
    return {"trainable": trainable, "frozen": frozen, "epoch_losses": result.epoch_losses,
            "shared_values": result.shared_values}


def retrain_file(source: Path, target: Path, data_spec: str, freeze: tuple[str, ...], settings: TrainSettings,
                 teacher_path: Path | None = None, limit: int | None = None,
                 progress: Callable[[int, int, float], None] | None = None) -> dict:
    model = OnnxModel.load(source)
    teacher = None if teacher_path is None else OnnxModel.load(teacher_path)
    dataset = load_dataset(data_spec, model_input_shape(source), limit)
    logits = None if teacher is None else teacher_logits(teacher, dataset.x)
    report = retrain_model(model, dataset.x, dataset.y, freeze, settings, logits, progress)
    model.save(target)
    return {"input": str(source), "output": str(target), "data": dataset.name, "samples": len(dataset),
            "loss": "distillation" if dataset.y is None else ("cross-entropy + distillation" if teacher else
                                                                "cross-entropy"),
            "warnings": model_warnings(model), **report}
