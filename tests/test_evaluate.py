"""The evaluation core: batched onnxruntime inference, accuracy/agreement metrics and the gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from weightless_cli.data import Dataset
from weightless_cli.data.datasets import LABELS_GIVEN, NO_LABELS
from weightless_cli.errors import EXIT_CHECK_FAILED, BadInputError, CheckFailedError, UsageError
from weightless_cli.stages.evaluate import (
    EvalResult,
    ModelRunner,
    evaluate,
    gate,
    gate_passes,
    model_input_shape,
    predict,
)

FEATURES, CLASSES = 6, 4


def linear_model(
    weight: np.ndarray,
    batch: int | str | None = "N",
    elem_type: int = TensorProto.FLOAT,
    weight_as_input: bool = False,
) -> bytes:
    """logits = x @ weight, as a one-MatMul ONNX model (opset 17)."""
    weight = weight.astype(helper.tensor_dtype_to_np_dtype(elem_type))
    data = helper.make_tensor_value_info("x", elem_type, [batch, weight.shape[0]])
    inputs = [data]
    if weight_as_input:  # old exporters also list initializers as graph inputs
        inputs.append(helper.make_tensor_value_info("w", elem_type, list(weight.shape)))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "linear",
        inputs,
        [helper.make_tensor_value_info("logits", elem_type, [batch, weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture
def weight() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((FEATURES, CLASSES)).astype(np.float32)


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((25, FEATURES)).astype(np.float32)


# --- predict -------------------------------------------------------------------------


def test_predict_matches_numpy_for_any_batch_size(weight: np.ndarray, x: np.ndarray) -> None:
    model = linear_model(weight)
    expected = x @ weight
    for batch_size in (1, 7, 25, 1000):
        np.testing.assert_allclose(predict(model, x, batch_size=batch_size), expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(predict(model, x, batch_size=7), predict(model, x, batch_size=7))  # deterministic


def test_path_and_bytes_give_identical_logits(tmp_path: Path, weight: np.ndarray, x: np.ndarray) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(linear_model(weight))
    np.testing.assert_array_equal(predict(path, x), predict(path.read_bytes(), x))
    np.testing.assert_array_equal(predict(str(path), x, threads=2), predict(path, x))


def test_fixed_batch_model_gets_padded_batches(weight: np.ndarray, x: np.ndarray) -> None:
    runner = ModelRunner(linear_model(weight, batch=4))
    assert runner.fixed_batch() == 4
    logits = runner.predict(x, batch_size=1000)  # 25 samples = 6 full batches + 1 padded
    assert logits.shape == (25, CLASSES)
    np.testing.assert_allclose(logits, x @ weight, rtol=1e-5, atol=1e-5)


def test_initializer_listed_as_input_is_not_the_data_input(weight: np.ndarray, x: np.ndarray) -> None:
    runner = ModelRunner(linear_model(weight, weight_as_input=True))
    assert runner.input_name == "x" and runner.output_name == "logits"
    np.testing.assert_allclose(runner.predict(x), x @ weight, rtol=1e-5, atol=1e-5)


def test_double_input_model_receives_cast_data(weight: np.ndarray, x: np.ndarray) -> None:
    logits = predict(linear_model(weight, elem_type=TensorProto.DOUBLE), x)
    assert logits.dtype == np.float64
    np.testing.assert_allclose(logits, x.astype(np.float64) @ weight.astype(np.float64), rtol=1e-6)


def test_input_shape_reports_free_dims(weight: np.ndarray) -> None:
    assert model_input_shape(linear_model(weight)) == ("N", FEATURES)
    assert model_input_shape(linear_model(weight, batch=3)) == (3, FEATURES)


def test_data_of_the_wrong_size_names_the_data(weight: np.ndarray) -> None:
    dataset = Dataset("odd.npz", np.zeros((2, FEATURES + 1), np.float32))
    with pytest.raises(BadInputError, match=r"odd.npz has samples of shape \[7\].*expects \[N, 6\]"):
        evaluate(linear_model(weight), dataset)


def test_bad_models_are_bad_input_naming_the_file(tmp_path: Path, weight: np.ndarray, x: np.ndarray) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not protobuf")
    with pytest.raises(BadInputError, match=r"junk.onnx: not an ONNX model onnxruntime can load") as caught:
        predict(junk, x)
    assert "\n" not in str(caught.value)
    with pytest.raises(BadInputError, match="missing.onnx: no such file"):
        predict(tmp_path / "missing.onnx", x)
    with pytest.raises(BadInputError, match="<in-memory model>"):
        predict(b"\x00\x01", x)


def test_models_with_two_inputs_or_integer_inputs_are_refused(weight: np.ndarray) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 3]) for n in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [None, 3])],
    )
    two = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    with pytest.raises(BadInputError, match="2 data inputs"):
        ModelRunner(two)
    with pytest.raises(BadInputError, match="only float inputs"):
        ModelRunner(linear_model(np.ones((3, 2)), elem_type=TensorProto.INT64))


def test_bad_batch_size_and_empty_data(weight: np.ndarray, x: np.ndarray) -> None:
    with pytest.raises(UsageError, match="batch size"):
        predict(linear_model(weight), x, batch_size=0)
    with pytest.raises(BadInputError, match="no samples"):
        predict(linear_model(weight), x[:0])


# --- evaluate ------------------------------------------------------------------------


def test_accuracy_counts_exactly(weight: np.ndarray, x: np.ndarray) -> None:
    predicted = (x @ weight).argmax(1)
    labels = predicted.copy()
    labels[[0, 3, 9]] = (labels[[0, 3, 9]] + 1) % CLASSES  # exactly three wrong
    result = evaluate(linear_model(weight), Dataset("d", x, labels, None, LABELS_GIVEN), batch_size=4)
    assert result.samples == 25 and result.accuracy == 22 / 25 and result.error == 3 / 25
    assert result.reference is None and result.agreement is None and result.accuracy_drop_pp is None


def test_comparison_with_a_reference_model(weight: np.ndarray, x: np.ndarray) -> None:
    labels = (x @ weight).argmax(1)
    perturbed = weight.copy()
    perturbed[:, 0] += 0.5
    result = evaluate(
        linear_model(perturbed), Dataset("d", x, labels, None, LABELS_GIVEN), linear_model(weight)
    )
    expected_top1 = (x @ perturbed).argmax(1)
    assert result.reference == "model" and result.reference_accuracy == 1.0
    assert result.accuracy == result.agreement == float(np.mean(expected_top1 == labels))
    difference = np.abs(x.astype(np.float64) @ (perturbed - weight).astype(np.float64))
    assert result.max_abs_logit_diff == pytest.approx(difference.max(), rel=1e-5)
    assert result.mean_abs_logit_diff == pytest.approx(difference.mean(), rel=1e-5)
    assert result.accuracy_drop_pp == pytest.approx(100 * (1 - result.accuracy))


def test_unlabelled_data_gives_agreement_only(weight: np.ndarray, x: np.ndarray) -> None:
    result = evaluate(linear_model(weight), Dataset("u", x), reference=linear_model(weight * 2))
    assert result.label_source == NO_LABELS and result.accuracy is None and result.reference_accuracy is None
    assert result.agreement == 1.0 and result.max_abs_logit_diff > 0
    assert gate(result, 0.0) is True  # scaling logits never changes the top-1 class


def test_stored_outputs_serve_as_the_reference(weight: np.ndarray, x: np.ndarray) -> None:
    stored = (x @ weight).astype(np.float32)
    dataset = Dataset("test_data_set_0", x, stored.argmax(1), stored, "reference-argmax")
    result = evaluate(linear_model(weight), dataset)
    assert result.reference == "stored outputs" and result.agreement == 1.0
    assert result.max_abs_logit_diff < 1e-4


def test_reference_with_other_output_shape_is_bad_input(weight: np.ndarray, x: np.ndarray) -> None:
    other = linear_model(np.ones((FEATURES, CLASSES + 1), np.float32))
    with pytest.raises(BadInputError, match=r"shape \[25, 5\] but the model gives \[25, 4\]"):
        evaluate(linear_model(weight), Dataset("d", x), reference=other)


def test_outputs_that_are_not_class_scores_are_bad_input(x: np.ndarray) -> None:
    single = linear_model(np.ones((FEATURES, 1), np.float32))
    with pytest.raises(BadInputError, match=r"model output has shape \[25, 1\]"):
        evaluate(single, Dataset("d", x))


def test_to_dict_is_json_ready(weight: np.ndarray, x: np.ndarray) -> None:
    labels = (x @ weight).argmax(1)
    result = evaluate(linear_model(weight), Dataset("d", x, labels, None, LABELS_GIVEN), linear_model(weight))
    as_dict = json.loads(json.dumps(result.to_dict()))
    assert as_dict["accuracy"] == 1.0 and as_dict["accuracy_drop_pp"] == 0.0 and as_dict["samples"] == 25
    assert set(as_dict) >= {"dataset", "error", "reference_accuracy", "agreement", "max_abs_logit_diff"}


# --- the gate ------------------------------------------------------------------------


def _result(accuracy: float | None, reference_accuracy: float | None, agreement: float | None) -> EvalResult:
    return EvalResult("d", 100, "labels", accuracy, None, "model", reference_accuracy, agreement)


def test_gate_passes_up_to_the_allowed_drop_and_fails_beyond() -> None:
    assert gate(_result(0.985, 0.990, 0.99), 0.5) is True  # exactly 0.5 pp (within float noise) passes
    assert gate_passes(_result(0.995, 0.990, 0.99), 0.0)  # better than the reference passes
    assert not gate_passes(_result(0.984, 0.990, 0.99), 0.5)
    with pytest.raises(CheckFailedError, match="accuracy drop 0.60 pp exceeds the allowed 0.5 pp") as caught:
        gate(_result(0.984, 0.990, 0.99), 0.5)
    assert caught.value.exit_code == EXIT_CHECK_FAILED


def test_gate_on_unlabelled_data_uses_disagreement() -> None:
    assert gate_passes(_result(None, None, 0.996), 0.5)
    with pytest.raises(CheckFailedError, match="top-1 disagreement 0.70 pp"):
        gate(_result(None, None, 0.993), 0.5)


def test_gate_needs_a_reference_and_a_sane_threshold() -> None:
    without_reference = EvalResult("d", 100, "labels", 0.9, 0.1)
    with pytest.raises(UsageError, match="needs a reference"):
        gate(without_reference, 1.0)
    with pytest.raises(UsageError, match=">= 0"):
        gate(_result(0.9, 0.9, 1.0), -1.0)
    with pytest.raises(UsageError, match=">= 0"):
        gate_passes(_result(0.9, 0.9, 1.0), float("nan"))
