"""Measure a model's accuracy with onnxruntime, alone or against a reference model.

The core is :func:`evaluate`: it runs the model (a path, or serialized bytes straight from
a decoder) over a :class:`~weightless_cli.data.Dataset` in batches and reports accuracy
when there are labels, and top-1 agreement and logit differences when there is a reference
(a second model, or reference outputs stored with the data). :func:`gate` turns the result
into the pass/fail decision the CLI maps to exit code 1.

onnxruntime runs on the CPU with a fixed thread count and sequential execution so the
same model and data always give the same numbers.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort

from weightless_cli.data.datasets import Dataset, Dim, fit_to_input_shape
from weightless_cli.errors import BadInputError, CheckFailedError, UsageError
from weightless_cli.fileio import check_readable

DEFAULT_BATCH_SIZE = 1000
DEFAULT_THREADS = 1
ModelSource = str | os.PathLike | bytes
# Accuracies are ratios of counts, so a drop of exactly the allowed points can come out a
# hair above it in floating point (0.990 - 0.985 = 0.50000000000000044 pp); that still passes.
_GATE_SLACK_PP = 1e-9

# The float types a model input may have; the data (float32) is cast to the one it wants.
_FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


class ModelRunner:
    """One onnxruntime session over a model's single data input and first output."""

    def __init__(self, model: ModelSource, threads: int | None = None, name: str | None = None) -> None:
        self.name = name or ("<in-memory model>" if isinstance(model, bytes) else str(model))
        if not isinstance(model, bytes):
            # onnxruntime resolves external-data files relative to the model's path, so give it the path.
            model = str(check_readable(model))
        self.session = _open_session(model, threads or DEFAULT_THREADS, self.name)
        inputs = self.session.get_inputs()  # initializers are not listed here, only data inputs
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise BadInputError(
                f"model has {len(inputs)} data inputs ({names}); only single-input models are supported",
                self.name,
            )
        data_input = inputs[0]
        if data_input.type not in _FLOAT_INPUTS:
            raise BadInputError(
                f"model input {data_input.name!r} is {data_input.type}; only float inputs are supported",
                self.name,
            )
        self.input_name: str = data_input.name
        self.input_shape: tuple[Dim, ...] = tuple(data_input.shape)
        self.input_dtype = _FLOAT_INPUTS[data_input.type]
        self.output_name: str = self.session.get_outputs()[0].name

    def fixed_batch(self) -> int | None:
        """The batch size the model insists on, or None when its batch dimension is free."""
        first = self.input_shape[0] if self.input_shape else None
        return first if isinstance(first, int) and first > 0 else None

    def predict(
        self, x: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE, data_name: str = "input"
    ) -> np.ndarray:
        """The first output for every sample, computed ``batch_size`` samples at a time."""
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        if x.ndim == 0 or len(x) == 0:
            raise BadInputError(f"{data_name} holds no samples")
        x = fit_to_input_shape(x, self.input_shape, data_name).astype(self.input_dtype, copy=False)
        step = self.fixed_batch() or batch_size
        chunks = [self._run(x[start : start + step], step) for start in range(0, len(x), step)]
        return np.concatenate(chunks, axis=0)

    def _run(self, batch: np.ndarray, step: int) -> np.ndarray:
        count = len(batch)
        if self.fixed_batch() and count < step:
            # A fixed-batch model needs full batches: pad with zeros and drop their outputs.
            padding = np.zeros((step - count, *batch.shape[1:]), dtype=batch.dtype)
            batch = np.concatenate([batch, padding], axis=0)
        try:
            output = self.session.run([self.output_name], {self.input_name: batch})[0]
        except Exception as exc:  # onnxruntime raises its own exception types, all one-liners here
            raise BadInputError(
                f"onnxruntime failed to run the model: {_first_line(exc)}", self.name
            ) from None
        return np.asarray(output)[:count]


def _open_session(payload: bytes | str, threads: int, name: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.use_deterministic_compute = True
    options.log_severity_level = 3  # errors only: no warnings on the user's terminal
    try:
        return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BadInputError(f"not an ONNX model onnxruntime can load: {_first_line(exc)}", name) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def model_input_shape(model: ModelSource) -> tuple[Dim, ...]:
    """The data input's shape (ints, or None/names for free dimensions), for :func:`load_dataset`."""
    return ModelRunner(model).input_shape


def predict(
    model: ModelSource, x: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE, threads: int | None = None
) -> np.ndarray:
    """Run ``model`` on ``x`` and return its first output (the logits) for every sample."""
    return ModelRunner(model, threads).predict(x, batch_size)


def top1(outputs: np.ndarray, what: str) -> np.ndarray:
    """Index of the highest score per sample; outputs must be one score vector per sample."""
    if outputs.ndim < 2 or outputs.shape[1] < 2 or int(np.prod(outputs.shape[2:])) != 1:
        raise BadInputError(f"{what} output has shape {list(outputs.shape)}, not [N, classes] scores")
    return np.argmax(outputs.reshape(outputs.shape[0], outputs.shape[1]), axis=1)


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation measured. Rates are fractions in [0, 1]; None means not measured."""

    dataset: str
    samples: int
    label_source: str
    accuracy: float | None = None
    error: float | None = None
    reference: str | None = None  # "model" (a reference model) or "stored outputs" (from the data)
    reference_accuracy: float | None = None
    agreement: float | None = None
    max_abs_logit_diff: float | None = None
    mean_abs_logit_diff: float | None = None

    @property
    def accuracy_drop_pp(self) -> float | None:
        """Reference accuracy minus accuracy, in percentage points (positive = worse)."""
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return 100.0 * (self.reference_accuracy - self.accuracy)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready values, including the derived accuracy drop."""
        return {**asdict(self), "accuracy_drop_pp": self.accuracy_drop_pp}


def evaluate(
    model: ModelSource,
    dataset: Dataset,
    reference: ModelSource | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    threads: int | None = None,
) -> EvalResult:
    """Accuracy of ``model`` on ``dataset``, compared with ``reference`` when given.

    Without a reference model, reference outputs stored with the data (a test_data_set's
    ``output_0.pb``) are compared instead, when present.
    """
    logits = ModelRunner(model, threads).predict(dataset.x, batch_size, dataset.name)
    predicted = top1(logits, "model")
    measured: dict[str, object] = {}
    if dataset.y is not None:
        measured.update(_accuracy_fields(predicted, dataset.y))

    reference_logits, reference_kind = None, None
    if reference is not None:
        reference_logits = ModelRunner(reference, threads).predict(dataset.x, batch_size, dataset.name)
        reference_kind = "model"
    elif dataset.reference_outputs is not None:
        reference_logits, reference_kind = dataset.reference_outputs, "stored outputs"
    if reference_logits is not None:
        measured.update(_comparison_fields(logits, reference_logits, dataset.y, reference_kind))

    return EvalResult(
        dataset=dataset.name, samples=len(dataset), label_source=dataset.label_source, **measured
    )


def _accuracy_fields(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    # From counts, so accuracy + error is exactly 1 and 94 misses read as 0.0094, not 0.009399999...
    misses = int(np.count_nonzero(predicted != labels))
    return {"accuracy": (len(labels) - misses) / len(labels), "error": misses / len(labels)}


def _comparison_fields(
    logits: np.ndarray, reference_logits: np.ndarray, labels: np.ndarray | None, kind: str
) -> dict[str, object]:
    if reference_logits.shape != logits.shape:
        raise BadInputError(
            f"reference ({kind}) gives outputs of shape {list(reference_logits.shape)} "
            f"but the model gives {list(logits.shape)}"
        )
    reference_predicted = top1(reference_logits, "reference")
    # float64 so the differences are not themselves rounded to the models' precision
    difference = np.abs(logits.astype(np.float64) - reference_logits.astype(np.float64))
    fields: dict[str, object] = {
        "reference": kind,
        "agreement": float(np.mean(top1(logits, "model") == reference_predicted)),
        "max_abs_logit_diff": float(difference.max()),
        "mean_abs_logit_diff": float(difference.mean()),
    }
    if labels is not None:
        fields["reference_accuracy"] = float(np.mean(reference_predicted == labels))
    return fields


def gate_passes(result: EvalResult, max_drop_pp: float) -> bool:
    """True when the model is at most ``max_drop_pp`` points less accurate than its reference.

    On unlabelled data the share of samples where the two disagree stands in for the drop:
    the accuracy drop can never exceed it, so the gate errs on the safe side.
    """
    return _measured_drop_pp(result, max_drop_pp) <= max_drop_pp + _GATE_SLACK_PP


def gate(result: EvalResult, max_drop_pp: float) -> bool:
    """Return True if the accuracy gate passes; raise :class:`CheckFailedError` if not."""
    drop = _measured_drop_pp(result, max_drop_pp)
    if drop <= max_drop_pp + _GATE_SLACK_PP:
        return True
    measure = "accuracy drop" if result.accuracy_drop_pp is not None else "top-1 disagreement"
    raise CheckFailedError(
        f"accuracy gate failed: {measure} {drop:.2f} pp exceeds the allowed {max_drop_pp:g} pp"
    )


def _measured_drop_pp(result: EvalResult, max_drop_pp: float) -> float:
    if not max_drop_pp >= 0:  # also rejects NaN
        raise UsageError(f"the allowed accuracy drop must be a number >= 0, got {max_drop_pp}")
    if result.accuracy_drop_pp is not None:
        return result.accuracy_drop_pp
    if result.agreement is not None:
        return 100.0 * (1.0 - result.agreement)
    raise UsageError("the accuracy gate needs a reference (--reference MODEL, or data with stored outputs)")
