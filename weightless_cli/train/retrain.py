"""Fine-tune chosen float weights of an ONNX model without undoing its compression.

After pruning and k-means quantization a few epochs of retraining recover most of the
lost accuracy (Deep Compression, Han et al. 2016; Weightless, Reagen et al. 2018). The
caller writes the returned arrays back into the same graph under the same names.

What training preserves, per trainable tensor:

* **Pruned weights stay pruned.** Entries that are exactly zero at the start stay
  exactly zero (bit for bit, ``-0.0`` included).
* **Shared values stay shared.** A tensor with at most :data:`SHARED_MAX_VALUES`
  distinct nonzero values is treated as quantized: its distinct values (centroids) are
  the parameters, each element reads its centroid, so the gradient of a centroid is the
  sum of its elements' gradients, as in Deep Compression. The tensor keeps exactly its K
  values. ``unshare=True`` trains every nonzero element freely instead.
* **Frozen tensors are untouched**: only ``trainable`` tensors become parameters.

Loss: cross-entropy on the labels. With teacher logits it is knowledge distillation,
``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` at temperature ``T`` (Hinton et
al. 2015; default T=2): it matches the teacher's whole output distribution rather than
its raw logit scale. With both labels and teacher logits the loss is
``(1 - distill_weight) * CE + distill_weight * KD``. When the graph ends in a
Softmax/LogSoftmax over the classes, the loss reads the logits feeding it instead.

Optimizer: Adam (default, robust for fine-tuning at lr 1e-3) or SGD with momentum 0.9.
Learning rate: constant, or ``cosine``: annealed from ``lr`` to zero over the call's steps,
so that a retraining ends settled rather than wherever the last noisy step left it (on the
LeNet-5 compress recipe it measured no better than constant: 1.10 % vs 1.04 % test error).

Deterministic: the same inputs, seed and thread count give byte-identical weights (a
seeded shuffle, ``torch.use_deterministic_algorithms``, fixed thread count). CPU only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from weightless_cli.codecs.parallel import usable_cpus
from weightless_cli.errors import BadInputError, MissingExtraError, UsageError
from weightless_cli.train import LR_SCHEDULES
from weightless_cli.train.executor import MISSING_TORCH_MESSAGE, OnnxModule, weight_arrays

try:  # importing the executor has already raised MissingExtraError when torch is missing
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.utils import parametrize
except ImportError as exc:
    raise MissingExtraError(MISSING_TORCH_MESSAGE) from exc

SHARED_MAX_VALUES = 256  # at most this many distinct nonzero values => a quantized (shared) tensor
DEFAULT_TEMPERATURE = 2.0
DEFAULT_DISTILL_WEIGHT = 0.5
OPTIMIZERS = ("adam", "sgd")
SGD_MOMENTUM = 0.9

ProgressFn = Callable[[int, int, float], None]  # (steps done, total steps, loss of the last batch)


@dataclass
class RetrainResult:
    """Trained tensors by ONNX name (original dtype and shape) and the mean loss of each epoch."""

    weights: dict[str, np.ndarray]
    epoch_losses: list[float] = field(default_factory=list)
    shared_values: dict[str, int] = field(default_factory=dict)  # tensor -> K, for tensors trained as shared


# ---------------------------------------------------------------- structure (pure numpy)


@dataclass(frozen=True)
class WeightStructure:
    """What training must preserve in one tensor.

    ``index`` (only for shared tensors) maps every element to 0 when pruned or to k+1 for
    the k-th distinct value; ``first`` is the flat position of one element holding each value.
    """

    nonzero: np.ndarray
    index: np.ndarray | None = None
    first: np.ndarray | None = None

    @property
    def shared(self) -> bool:
        return self.index is not None

    @property
    def n_values(self) -> int:
        return 0 if self.first is None else len(self.first)


def weight_structure(values: np.ndarray, unshare: bool = False) -> WeightStructure:
    """Find the pruned entries and, unless ``unshare``, the shared values of one tensor."""
    exact = np.asarray(values).astype(np.float64)  # exact for every float type, bfloat16 included
    nonzero = exact != 0
    if unshare:
        return WeightStructure(nonzero)
    positions = np.flatnonzero(nonzero)
    if len(positions) == 0:  # fully pruned: nothing to share, and nothing will change
        return WeightStructure(nonzero)
    distinct, first, inverse = np.unique(exact.reshape(-1)[positions], return_index=True, return_inverse=True)
    if len(distinct) > SHARED_MAX_VALUES:
        return WeightStructure(nonzero)
    index = np.zeros(exact.size, dtype=np.int64)
    index[positions] = inverse.reshape(-1) + 1
    return WeightStructure(nonzero, index.reshape(exact.shape), positions[first])


def restore_pruned(trained: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Trained values where the original was nonzero; the original bits (±0) elsewhere."""
    return np.where(original != 0, trained.astype(original.dtype), original)


# ---------------------------------------------------------------- parametrizations


class _SharedValues(nn.Module):
    """weight = [0, v_1..v_K][index]: K trainable values; a cluster's gradient is the sum of its elements'."""

    def __init__(self, structure: WeightStructure) -> None:
        super().__init__()
        self.shape = structure.index.shape
        self.register_buffer("index", torch.from_numpy(structure.index.reshape(-1).copy()))
        self.register_buffer("first", torch.from_numpy(structure.first.astype(np.int64)))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        table = torch.cat([values.new_zeros(1), values])
        return table.index_select(0, self.index).reshape(self.shape)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(-1).index_select(0, self.first)


class _KeepZeros(nn.Module):
    """weight = w * mask: pruned entries get no gradient and stay zero."""

    def __init__(self, nonzero: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mask", torch.from_numpy(nonzero.astype(np.float32)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _constrain(module: OnnxModule, name: str, structure: WeightStructure) -> None:
    attr = module.attribute_name(name)
    if structure.shared:
        parametrize.register_parametrization(module, attr, _SharedValues(structure))
    elif not structure.nonzero.all():
        parametrize.register_parametrization(module, attr, _KeepZeros(structure.nonzero))


# ---------------------------------------------------------------- logits


def logits_output(model: onnx.ModelProto) -> str:
    """The graph tensor holding the logits: the first output, or the input of a final (Log)Softmax."""
    output = model.graph.output[0].name
    producer = next((node for node in model.graph.node if output in node.output), None)
    if producer is None or producer.domain not in ("", "ai.onnx") or producer.op_type not in ("Softmax", "LogSoftmax"):
        return output
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    axis = next((helper.get_attribute_value(a) for a in producer.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
    # Classifier outputs are (batch, classes): axis 1 or -1 is the class axis.
    return producer.input[0] if axis in (1, -1) else output


def _as_batch_logits(output: torch.Tensor) -> torch.Tensor:
    if output.dim() > 2 and all(size == 1 for size in output.shape[2:]):
        output = output.flatten(1)
    if output.dim() != 2:
        raise BadInputError(f"the model's output has shape {tuple(output.shape)}; retraining needs (batch, classes) logits")
    return output


def compute_logits(model: onnx.ModelProto, x: np.ndarray, *, batch_size: int = 512, threads: int | None = None) -> np.ndarray:
    """The model's logits for ``x`` (pre-softmax, as :func:`retrain` sees them), e.g. as teacher logits."""
    with _torch_runtime(threads, seed=0):
        module = OnnxModule(model, output=logits_output(model))
        inputs = _input_tensor(x)
        with torch.inference_mode():
            chunks = [_as_batch_logits(module(inputs[i : i + batch_size])) for i in range(0, len(inputs), batch_size)]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------- retraining


def retrain(
    model: onnx.ModelProto,
    x: np.ndarray,
    y: np.ndarray | None,
    *,
    trainable: Sequence[str],
    frozen: Iterable[str] = (),
    teacher_logits: np.ndarray | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    unshare: bool = False,
    progress: ProgressFn | None = None,
    optimizer: str = "adam",
    lr_schedule: str = "constant",
    temperature: float = DEFAULT_TEMPERATURE,
    distill_weight: float = DEFAULT_DISTILL_WEIGHT,
    threads: int | None = None,
) -> RetrainResult:
    """Fine-tune the ``trainable`` float tensors of ``model`` on ``x`` (see the module docstring)."""
    trainable = list(dict.fromkeys(trainable))
    _check_options(epochs, lr, batch_size, optimizer, lr_schedule, temperature, distill_weight)
    originals = weight_arrays(model)
    _check_names(trainable, set(frozen), originals)
    _check_data(x, y, teacher_logits)
    structures = {name: weight_structure(originals[name], unshare) for name in trainable}

    with _torch_runtime(threads, seed):
        module = OnnxModule(model, trainable, output=logits_output(model))
        for name, structure in structures.items():
            _constrain(module, name, structure)
        inputs = _input_tensor(x)
        labels = None if y is None else torch.from_numpy(np.asarray(y).astype(np.int64))
        teacher = None if teacher_logits is None else torch.from_numpy(np.asarray(teacher_logits, dtype=np.float32))
        _check_against_model(module, inputs, labels, teacher)
        objective = _objective(labels is not None, teacher is not None, temperature, distill_weight)
        history = _fit(module, inputs, labels, teacher, objective, _optimizer(module, optimizer, lr),
                       _lr_at(lr, lr_schedule), epochs, batch_size, np.random.default_rng(seed), progress)
        trained = module.state_arrays()

    weights = {name: restore_pruned(trained[name], originals[name]) for name in trainable}
    shared = {name: s.n_values for name, s in structures.items() if s.shared}
    return RetrainResult(weights, history, shared)


def _lr_at(lr: float, schedule: str) -> Callable[[int, int], float]:
    """The learning rate for step ``done`` of ``total`` (0-based)."""
    if schedule == "cosine":
        return lambda done, total: 0.5 * lr * (1 + math.cos(math.pi * done / total))
    return lambda done, total: lr


def _fit(module, inputs, labels, teacher, objective, optimizer, lr_at, epochs, batch_size, rng,
         progress) -> list[float]:
    count = len(inputs)
    steps_per_epoch = -(-count // batch_size)
    history: list[float] = []
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(count))
        total = 0.0
        for step in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + step, epochs * steps_per_epoch)
            batch = order[step * batch_size : (step + 1) * batch_size]
            logits = _as_batch_logits(module(inputs[batch]))
            loss = objective(
                logits, None if labels is None else labels[batch], None if teacher is None else teacher[batch]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                raise UsageError(f"training diverged (loss {value}) in epoch {epoch + 1}; try a smaller learning rate")
            total += value * len(batch)
            if progress is not None:
                progress(epoch * steps_per_epoch + step + 1, epochs * steps_per_epoch, value)
        history.append(total / count)
    return history


def _objective(has_labels: bool, has_teacher: bool, temperature: float, distill_weight: float):
    def distill(logits, teacher):
        student = F.log_softmax(logits / temperature, dim=1)
        target = F.log_softmax(teacher / temperature, dim=1)
        return F.kl_div(student, target, reduction="batchmean", log_target=True) * temperature**2

    def loss(logits, labels, teacher):
        if not has_teacher:
            return F.cross_entropy(logits, labels)
        if not has_labels:
            return distill(logits, teacher)
        return (1 - distill_weight) * F.cross_entropy(logits, labels) + distill_weight * distill(logits, teacher)

    return loss


def _optimizer(module: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    params = list(module.parameters())
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
    return torch.optim.Adam(params, lr=lr)


def _input_tensor(x: np.ndarray) -> torch.Tensor:
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
        return torch.from_numpy(np.array(x, dtype=np.float32, order="C"))
    if np.issubdtype(x.dtype, np.integer):
        return torch.from_numpy(np.array(x, dtype=np.int64, order="C"))  # e.g. token ids for an embedding
    raise BadInputError(f"input data of type {x.dtype} cannot feed the model")


def default_threads() -> int:
    """All CPUs but one (at most 8): small models scale poorly, and oversubscribed CPUs slow torch badly."""
    return max(1, min(usable_cpus() - 1, 8))


@contextlib.contextmanager
def _torch_runtime(threads: int | None, seed: int) -> Iterator[None]:
    """Fixed threads, deterministic kernels and a seeded torch RNG, restored afterwards."""
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.set_num_threads(threads or default_threads())
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


# ---------------------------------------------------------------- argument checks


def _check_options(epochs, lr, batch_size, optimizer, lr_schedule, temperature, distill_weight) -> None:
    if epochs < 0:
        raise UsageError(f"epochs must be 0 or more, got {epochs}")
    if not lr > 0:
        raise UsageError(f"learning rate must be positive, got {lr}")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if lr_schedule not in LR_SCHEDULES:
        raise UsageError(f"unknown learning-rate schedule {lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not temperature > 0:
        raise UsageError(f"distillation temperature must be positive, got {temperature}")
    if not 0 <= distill_weight <= 1:
        raise UsageError(f"distillation weight must be between 0 and 1, got {distill_weight}")


def _check_names(trainable: list[str], frozen: set[str], weights: dict[str, np.ndarray]) -> None:
    if not trainable:
        raise UsageError("no tensors to retrain")
    unknown = sorted(frozen - set(weights))
    if unknown:
        raise UsageError(f"no initializer or Constant named {', '.join(map(repr, unknown))} in the model")
    both = [name for name in trainable if name in frozen]
    if both:
        raise UsageError(f"tensors both trainable and frozen: {', '.join(map(repr, both))}")
    for name in trainable:
        values = weights.get(name)
        if values is not None and values.dtype.kind == "f" and not np.isfinite(values).all():
            raise BadInputError(f"tensor {name!r} holds NaN or infinite values")


def _check_data(x: np.ndarray, y: np.ndarray | None, teacher_logits: np.ndarray | None) -> None:
    count = len(x)
    if count == 0:
        raise BadInputError("no training examples")
    if y is None and teacher_logits is None:
        raise UsageError("retraining without labels needs teacher logits to distill from")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (count,) or not np.issubdtype(y.dtype, np.integer):
            raise BadInputError(f"labels must be {count} integers (one per example), got {y.dtype} {y.shape}")
    if teacher_logits is not None and (np.ndim(teacher_logits) != 2 or len(teacher_logits) != count):
        raise BadInputError(f"teacher logits must have shape ({count}, classes), got {np.shape(teacher_logits)}")


def _check_against_model(module: OnnxModule, inputs, labels, teacher) -> None:
    """Probe one example for the number of classes, then check labels and teacher logits fit."""
    with torch.no_grad():
        classes = _as_batch_logits(module(inputs[:1])).shape[1]
    if labels is not None and (labels.min() < 0 or labels.max() >= classes):
        raise BadInputError(f"labels must lie in 0..{classes - 1} for this model's {classes} outputs")
    if teacher is not None and teacher.shape[1] != classes:
        raise BadInputError(f"teacher logits have {teacher.shape[1]} classes, the model has {classes}")
