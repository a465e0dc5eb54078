"""Evaluation data in model-ready form, from a short spec string.

A spec is one of:

* ``mnist`` / ``mnist:test`` / ``mnist:train`` -- the cached real MNIST (see :mod:`.mnist`),
  images as float32 in [0, 1] shaped [N, 1, 28, 28], labels as int64;
* a ``.npz`` file holding ``x`` (model-ready floats) and optionally ``y`` (integer labels);
* an ONNX-Runtime-style ``test_data_set_*`` folder (``input_0.pb`` and optionally
  ``output_0.pb``, serialized TensorProtos), or a model folder holding several of them,
  which are concatenated along the batch axis.

Inputs are reshaped to the model's input shape when the per-sample element counts agree,
so e.g. flat [N, 784] vectors feed a [N, 1, 28, 28] model.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from weightless_cli.data.mnist import load_mnist
from weightless_cli.errors import BadInputError, UsageError
from weightless_cli.fileio import read_input_bytes

# A model input dimension: a fixed size, or None / a symbolic name meaning "any".
Dim = int | str | None

LABELS_GIVEN = "labels"
LABELS_FROM_REFERENCE = "reference-argmax"
NO_LABELS = "none"


@dataclass(frozen=True)
class Dataset:
    """Samples ready to feed a model, with labels when known.

    ``label_source`` says where ``y`` came from: real labels, the argmax of reference
    outputs stored beside the inputs, or nowhere (``y`` is None).
    """

    name: str
    x: np.ndarray
    y: np.ndarray | None = None
    reference_outputs: np.ndarray | None = None
    label_source: str = NO_LABELS

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_dataset(spec: str, input_shape: Sequence[Dim] | None = None, limit: int | None = None) -> Dataset:
    """Load the data a spec names, shaped for a model whose input shape is ``input_shape``."""
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    dataset = _load_unshaped(spec, limit)
    if input_shape is not None:
        dataset = _replace_x(dataset, fit_to_input_shape(dataset.x, input_shape, dataset.name))
    return dataset


def _load_unshaped(spec: str, limit: int | None) -> Dataset:
    name, _, split = spec.partition(":")
    if name.lower() == "mnist":  # a file or folder really named "mnist" can be given as ./mnist
        return mnist_dataset(split or "test", limit)
    path = Path(spec)
    if path.is_dir():
        return _take(test_data_set_dataset(path), limit)
    if path.suffix.lower() == ".npz":
        return _take(npz_dataset(path), limit)
    if not path.exists():
        raise BadInputError(
            "no such data file or folder (expected mnist[:train|:test], a .npz or a test_data_set folder)",
            path,
        )
    raise BadInputError("unsupported data file; expected a .npz or a test_data_set_* folder", path)


def mnist_dataset(split: str = "test", limit: int | None = None) -> Dataset:
    """Cached MNIST as float32 [N,1,28,28] in [0,1] with int64 labels."""
    images, labels = load_mnist(split)
    # Slice before converting so a small --limit does not pay for the whole split.
    images, labels = images[:limit], labels[:limit]
    x = (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    return Dataset(f"mnist:{split}", x, labels.astype(np.int64), None, LABELS_GIVEN)


def npz_dataset(path: str | os.PathLike) -> Dataset:
    """An ``.npz`` with float ``x`` (model-ready) and optional integer ``y`` labels."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files:
                raise BadInputError(
                    f"npz has no 'x' array (found: {', '.join(archive.files) or 'nothing'})", path
                )
            x = archive["x"]
            y = archive["y"] if "y" in archive.files else None
    except FileNotFoundError:
        raise BadInputError("no such file", path) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInputError(f"not a readable .npz file: {exc}", path) from None
    x = _as_float_samples(x, path)
    if y is None:
        return Dataset(path.name, x)
    return Dataset(path.name, x, _as_labels(y, len(x), path), None, LABELS_GIVEN)


def test_data_set_dataset(folder: str | os.PathLike) -> Dataset:
    """One ``test_data_set_*`` folder, or a folder of them concatenated in numeric order."""
    folder = Path(folder)
    sets = _test_data_set_folders(folder)
    inputs = [_read_tensor(one / "input_0.pb") for one in sets]
    _refuse_extra_inputs(sets)
    output_files = [one / "output_0.pb" for one in sets]
    outputs = [_read_tensor(f) for f in output_files if f.exists()]
    if outputs and len(outputs) != len(sets):
        raise BadInputError("some test_data_set folders have output_0.pb and some do not", folder)
    x = _as_float_samples(_concatenate(inputs, folder, "input_0.pb"), folder)
    reference = _concatenate(outputs, folder, "output_0.pb") if outputs else None
    if reference is not None and len(reference) != len(x):
        raise BadInputError(
            f"output_0.pb holds {len(reference)} samples but input_0.pb holds {len(x)}", folder
        )
    labels = labels_from_logits(reference)
    source = LABELS_FROM_REFERENCE if labels is not None else NO_LABELS
    return Dataset(folder.name, x, labels, reference, source)


def labels_from_logits(outputs: np.ndarray | None) -> np.ndarray | None:
    """argmax labels when ``outputs`` look like per-class scores ([N, C] floats, C >= 2)."""
    if outputs is None or not np.issubdtype(outputs.dtype, np.floating):
        return None
    # Trailing singleton dims (e.g. [N, C, 1, 1]) still count as one score vector per sample.
    if outputs.ndim < 2 or math.prod(outputs.shape[2:]) != 1 or outputs.shape[1] < 2:
        return None
    scores = outputs.reshape(outputs.shape[0], outputs.shape[1])
    return np.argmax(scores, axis=1).astype(np.int64)


def fit_to_input_shape(x: np.ndarray, input_shape: Sequence[Dim], data_name: str) -> np.ndarray:
    """Reshape samples to the model's per-sample shape when the element counts agree.

    The first model dimension is the batch. Other dimensions may be None or symbolic,
    meaning "any": then the data's own shape must already fit them.
    """
    if len(input_shape) == 0:
        raise BadInputError(f"the model input is a scalar; cannot feed samples from {data_name}")
    per_sample = list(input_shape[1:])
    sample_shape = x.shape[1:]
    if _fits(sample_shape, per_sample):
        return x
    known = [d for d in per_sample if isinstance(d, int) and d > 0]
    if len(known) == len(per_sample) and math.prod(known) == math.prod(sample_shape):
        return x.reshape((x.shape[0], *known))
    raise BadInputError(
        f"data {data_name} has samples of shape {list(sample_shape)} ({math.prod(sample_shape)} values) "
        f"but the model expects {_shape_text(input_shape)}"
    )


def _fits(sample_shape: tuple[int, ...], per_sample: list[Dim]) -> bool:
    if len(sample_shape) != len(per_sample):
        return False
    return all(
        not isinstance(d, int) or d <= 0 or d == s for s, d in zip(sample_shape, per_sample, strict=True)
    )


def _shape_text(shape: Sequence[Dim]) -> str:
    return (
        "[" + ", ".join("?" if d is None or (isinstance(d, int) and d <= 0) else str(d) for d in shape) + "]"
    )


def _take(dataset: Dataset, limit: int | None) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset

    def head(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else array[:limit]

    return Dataset(
        dataset.name,
        dataset.x[:limit],
        head(dataset.y),
        head(dataset.reference_outputs),
        dataset.label_source,
    )


def _replace_x(dataset: Dataset, x: np.ndarray) -> Dataset:
    return Dataset(dataset.name, x, dataset.y, dataset.reference_outputs, dataset.label_source)


def _as_float_samples(x: np.ndarray, source: Path) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.floating):
        raise BadInputError(f"inputs must be model-ready floats, got {x.dtype}", source)
    if x.ndim < 1 or x.shape[0] == 0:
        raise BadInputError(
            f"inputs must have a batch axis with at least one sample, got shape {list(x.shape)}", source
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def _as_labels(y: np.ndarray, count: int, source: Path) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise BadInputError(
            f"'y' must be a 1-D array of integer labels, got {y.dtype} {list(y.shape)}", source
        )
    if len(y) != count:
        raise BadInputError(f"'y' has {len(y)} labels but 'x' has {count} samples", source)
    return y.astype(np.int64)


def _test_data_set_folders(folder: Path) -> list[Path]:
    if (folder / "input_0.pb").exists():
        return [folder]
    numbered = []
    for child in folder.iterdir():
        match = re.fullmatch(r"test_data_set_(\d+)", child.name)
        if match and child.is_dir():
            numbered.append((int(match.group(1)), child))
    if not numbered:
        raise BadInputError("folder has neither input_0.pb nor test_data_set_* folders", folder)
    return [child for _, child in sorted(numbered)]


def _refuse_extra_inputs(sets: list[Path]) -> None:
    for one in sets:
        if (one / "input_1.pb").exists():
            raise BadInputError(
                "holds several inputs (input_1.pb); only single-input models are supported", one
            )


def _read_tensor(path: Path) -> np.ndarray:
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(read_input_bytes(path))
        return numpy_helper.to_array(tensor)
    except BadInputError:
        raise
    except Exception as exc:  # protobuf raises DecodeError; to_array raises on odd dtypes
        raise BadInputError(f"not a serialized ONNX TensorProto: {exc}", path) from None


def _concatenate(arrays: list[np.ndarray], folder: Path, what: str) -> np.ndarray:
    if len(arrays) == 1:
        return arrays[0]
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1 or any(a.ndim == 0 for a in arrays):
        raise BadInputError(f"the {what} tensors have different per-sample shapes: {sorted(shapes)}", folder)
    return np.concatenate(arrays, axis=0)
