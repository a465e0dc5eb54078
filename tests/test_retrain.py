"""Retraining keeps pruned zeros, shared values and frozen tensors, learns, and is deterministic."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from weightless_cli.errors import BadInputError, UsageError

torch = pytest.importorskip("torch")
from weightless_cli.train.executor import weight_arrays  # noqa: E402
from weightless_cli.train.retrain import (  # noqa: E402
    SHARED_MAX_VALUES,
    _SharedValues,
    compute_logits,
    logits_output,
    retrain,
    weight_structure,
)

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parent.parent
FEATURES, HIDDEN, CLASSES = 12, 64, 4


# ---------------------------------------------------------------- synthetic models and data


def _mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, softmax: bool = False) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "fc2.weight"], ["logits"]),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    output = "probs" if softmax else "logits"
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", FEATURES])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["n", CLASSES])],
        [numpy_helper.from_array(w1, "fc1.weight"), numpy_helper.from_array(b1, "fc1.bias"),
         numpy_helper.from_array(w2, "fc2.weight")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((HIDDEN, FEATURES)) * 0.4).astype(np.float32)
    b1 = (rng.standard_normal(HIDDEN) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, CLASSES)) * 0.3).astype(np.float32)
    return w1, b1, w2


def _pruned(values: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    values = values.copy()
    values[np.random.default_rng(seed).random(values.shape) < fraction] = 0
    values[values.shape[0] // 2] = -0.0  # a negative zero must come back bit-exact
    return values


def _quantized(values: np.ndarray, k: int) -> np.ndarray:
    """Snap nonzero values to k evenly spaced levels (zeros stay zero)."""
    levels = np.linspace(values.min(), values.max(), k).astype(values.dtype)
    snapped = levels[np.abs(values[..., None] - levels).argmin(-1)]
    return np.where(values != 0, snapped, values)


def _task(count: int = 1024, seed: int = 1):
    """A learnable 4-class problem: the class is the argmax of a fixed linear map."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, FEATURES)).astype(np.float32)
    y = (x @ rng.standard_normal((FEATURES, CLASSES))).argmax(1).astype(np.int64)
    return x, y


def _accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    return float((compute_logits(model, x).argmax(1) == y).mean())


def _with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """What the lead's stage does: write the tensors back under the same names."""
    updated = onnx.ModelProto()
    updated.CopyFrom(model)
    for init in updated.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name], init.name))
    return updated


def _distinct_nonzero(values: np.ndarray) -> np.ndarray:
    return np.unique(values[values != 0])


# ---------------------------------------------------------------- invariants


def test_pruned_zeros_stay_exactly_zero_while_the_rest_learns() -> None:
    w1, b1, w2 = _weights()
    w1 = _pruned(w1, 0.4, seed=2)
    assert len(_distinct_nonzero(w1)) > SHARED_MAX_VALUES  # trained element by element
    model = _mlp(w1, b1, w2)
    x, y = _task()
    before = _accuracy(model, x, y)

    result = retrain(model, x, y, trainable=["fc1.weight", "fc1.bias", "fc2.weight"], epochs=4, lr=1e-2, batch_size=64)

    trained = result.weights["fc1.weight"]
    assert trained.dtype == np.float32 and trained.shape == w1.shape
    zeros = w1 == 0
    assert trained[zeros].tobytes() == w1[zeros].tobytes()  # bit-exact, -0.0 included
    assert np.all(trained[~zeros] != w1[~zeros])
    assert result.epoch_losses[-1] < 0.8 * result.epoch_losses[0]
    assert _accuracy(_with_weights(model, result.weights), x, y) > before + 0.1
    assert "fc1.weight" not in result.shared_values


def test_shared_values_keep_exactly_k_values_and_their_clusters() -> None:
    w1, b1, w2 = _weights()
    w1 = _quantized(_pruned(w1, 0.5, seed=3), k=16)
    w2 = _quantized(w2, k=5)
    model = _mlp(w1, b1, w2)
    x, y = _task()

    result = retrain(model, x, y, trainable=["fc1.weight", "fc2.weight"], epochs=3, lr=1e-2, batch_size=64)

    assert result.shared_values == {"fc1.weight": len(_distinct_nonzero(w1)), "fc2.weight": len(_distinct_nonzero(w2))}
    assert 10 <= result.shared_values["fc1.weight"] <= 16
    for name, original in (("fc1.weight", w1), ("fc2.weight", w2)):
        trained = result.weights[name]
        assert len(_distinct_nonzero(trained)) == len(_distinct_nonzero(original))
        assert not np.array_equal(_distinct_nonzero(trained), _distinct_nonzero(original))  # the centroids moved
        assert trained[original == 0].tobytes() == original[original == 0].tobytes()
        # Elements that shared a value before still share one, and only those.
        for value in _distinct_nonzero(original):
            assert len(np.unique(trained[original == value])) == 1
    assert result.epoch_losses[-1] < result.epoch_losses[0]


def test_centroid_gradient_is_the_sum_of_its_elements_gradients() -> None:
    values = np.array([[0.5, 0.0, -1.0], [0.5, 2.0, -1.0]], dtype=np.float32)
    structure = weight_structure(values)
    shared = _SharedValues(structure)
    centroids = shared.right_inverse(torch.from_numpy(values)).clone().requires_grad_(True)
    upstream = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 1
    (shared(centroids) * upstream).sum().backward()
    expected = [upstream.numpy()[values == v].sum() for v in np.unique(values[values != 0])]
    np.testing.assert_array_equal(centroids.grad.numpy(), expected)
    np.testing.assert_array_equal(shared(centroids).detach().numpy(), values)


def test_unshare_trains_each_nonzero_element_but_keeps_zeros() -> None:
    w1, b1, w2 = _weights()
    w1 = _quantized(_pruned(w1, 0.5, seed=3), k=8)
    model = _mlp(w1, b1, w2)
    x, y = _task(512)
    result = retrain(model, x, y, trainable=["fc1.weight"], epochs=2, lr=1e-2, batch_size=64, unshare=True)
    trained = result.weights["fc1.weight"]
    assert len(_distinct_nonzero(trained)) > 8
    assert np.all(trained[w1 == 0] == 0)
    assert result.shared_values == {}


def test_only_trainable_tensors_change_and_frozen_ones_are_rejected_as_trainable() -> None:
    w1, b1, w2 = _weights()
    model = _mlp(w1, b1, w2)
    x, y = _task(256)
    result = retrain(model, x, y, trainable=["fc2.weight"], frozen=["fc1.weight", "fc1.bias"], epochs=1)
    assert set(result.weights) == {"fc2.weight"}
    after = weight_arrays(_with_weights(model, result.weights))
    assert after["fc1.weight"].tobytes() == w1.tobytes() and after["fc1.bias"].tobytes() == b1.tobytes()
    with pytest.raises(UsageError, match="both trainable and frozen"):
        retrain(model, x, y, trainable=["fc2.weight", "fc1.bias"], frozen=["fc1.bias"])
    with pytest.raises(UsageError, match="'missing'"):
        retrain(model, x, y, trainable=["fc2.weight"], frozen=["missing"])


def test_float16_tensor_comes_back_float16_with_zeros_kept() -> None:
    w1, b1, w2 = _weights()
    w2 = _pruned(w2, 0.4, seed=5).astype(np.float16)
    model = _mlp(w1, b1, w2)
    model.graph.node.insert(2, helper.make_node("Cast", ["fc2.weight"], ["fc2.weight32"], to=TensorProto.FLOAT))
    model.graph.node[3].input[1] = "fc2.weight32"
    x, y = _task(256)
    trained = retrain(model, x, y, trainable=["fc2.weight"], epochs=1, lr=1e-2).weights["fc2.weight"]
    assert trained.dtype == np.float16
    assert trained[w2 == 0].tobytes() == w2[w2 == 0].tobytes()
    assert not np.array_equal(trained, w2)


# ---------------------------------------------------------------- distillation and losses


def test_distillation_without_labels_raises_agreement_with_the_teacher() -> None:
    teacher = _mlp(*_weights(seed=0))
    w1, b1, w2 = _weights(seed=0)
    student = _mlp(_pruned(w1 + np.random.default_rng(9).normal(0, 0.3, w1.shape).astype(np.float32), 0.5, 4), b1, w2)
    x, _ = _task(1024, seed=7)
    teacher_logits = compute_logits(teacher, x)

    def agreement(model: onnx.ModelProto) -> float:
        return float((compute_logits(model, x).argmax(1) == teacher_logits.argmax(1)).mean())

    before = agreement(student)
    result = retrain(student, x, None, trainable=["fc1.weight", "fc2.weight"], teacher_logits=teacher_logits,
                     epochs=4, lr=5e-3, batch_size=64)
    assert agreement(_with_weights(student, result.weights)) > before + 0.05
    assert result.epoch_losses[-1] < result.epoch_losses[0]


def test_labels_and_teacher_together_and_sgd() -> None:
    w1, b1, w2 = _weights()
    model = _mlp(w1, b1, w2)
    x, y = _task(512)
    teacher = compute_logits(model, x)
    result = retrain(model, x, y, trainable=["fc2.weight"], teacher_logits=teacher, epochs=2, lr=0.05,
                     optimizer="sgd", distill_weight=0.3)
    assert result.epoch_losses[-1] < result.epoch_losses[0]


def test_no_labels_needs_a_teacher() -> None:
    x, _ = _task(64)
    with pytest.raises(UsageError, match="teacher"):
        retrain(_mlp(*_weights()), x, None, trainable=["fc2.weight"])


def test_bad_labels_and_teacher_shapes_are_input_errors() -> None:
    model = _mlp(*_weights())
    x, y = _task(64)
    with pytest.raises(BadInputError, match="0..3"):
        retrain(model, x, y + CLASSES, trainable=["fc2.weight"])
    with pytest.raises(BadInputError, match="labels"):
        retrain(model, x, y[:10], trainable=["fc2.weight"])
    with pytest.raises(BadInputError, match="classes"):
        retrain(model, x, None, trainable=["fc2.weight"], teacher_logits=np.zeros((64, 7), np.float32))


@pytest.mark.parametrize(
    ("options", "message"),
    [({"lr": 0}, "learning rate"), ({"batch_size": 0}, "batch size"), ({"epochs": -1}, "epochs"),
     ({"optimizer": "lbfgs"}, "optimizer"), ({"lr_schedule": "step"}, "schedule"), ({"trainable": []}, "no tensors")],
)
def test_bad_options_are_usage_errors(options: dict, message: str) -> None:
    x, y = _task(32)
    arguments = {"trainable": ["fc2.weight"], **options}
    with pytest.raises(UsageError, match=message):
        retrain(_mlp(*_weights()), x, y, **arguments)


def test_cosine_schedule_anneals_from_lr_to_zero_and_still_learns() -> None:
    from weightless_cli.train.retrain import _lr_at

    cosine = _lr_at(0.1, "cosine")
    assert cosine(0, 100) == pytest.approx(0.1) and cosine(50, 100) == pytest.approx(0.05)
    assert 0 < cosine(99, 100) < 1e-4 and _lr_at(0.1, "constant")(99, 100) == 0.1
    x, y = _task(512)
    model = _mlp(*_weights())
    before = _accuracy(model, x, y)
    annealed = retrain(model, x, y, trainable=["fc1.weight", "fc2.weight"], epochs=5, lr=0.03, lr_schedule="cosine")
    constant = retrain(model, x, y, trainable=["fc1.weight", "fc2.weight"], epochs=5, lr=0.03)
    assert not np.array_equal(annealed.weights["fc1.weight"], constant.weights["fc1.weight"])
    assert _accuracy(_with_weights(model, annealed.weights), x, y) > before + 0.1


def test_divergence_is_reported_not_returned() -> None:
    x, y = _task(256)
    with pytest.raises(UsageError, match="diverged"):
        retrain(_mlp(*_weights()), x * 1e30, y, trainable=["fc1.weight"], lr=1e30, optimizer="sgd")


def test_final_softmax_is_skipped_for_the_loss() -> None:
    model = _mlp(*_weights(), softmax=True)
    assert logits_output(model) == "logits"
    x, y = _task(64)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {"x": x})[0]
    logits = compute_logits(model, x)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), probabilities, atol=1e-5)
    assert retrain(model, x, y, trainable=["fc2.weight"], epochs=2, lr=1e-2).epoch_losses[-1] > 0


# ---------------------------------------------------------------- determinism and speed


def _cnn_model() -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    conv = _quantized((rng.standard_normal((6, 1, 3, 3)) * 0.5).astype(np.float32), 32)
    fc = _pruned((rng.standard_normal((CLASSES, 6 * 4 * 4)) * 0.2).astype(np.float32), 0.5, 6)
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", CLASSES])],
        [numpy_helper.from_array(conv, "conv.weight"), numpy_helper.from_array(np.zeros(6, np.float32) + 0.1, "conv.bias"),
         numpy_helper.from_array(fc, "fc.weight")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_same_seed_gives_byte_identical_weights_and_another_seed_does_not() -> None:
    model = _cnn_model()
    rng = np.random.default_rng(12)
    x = rng.standard_normal((300, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, CLASSES, 300)
    names = ["conv.weight", "conv.bias", "fc.weight"]

    def run(seed: int) -> dict[str, bytes]:
        result = retrain(model, x, y, trainable=names, epochs=2, batch_size=32, seed=seed, threads=2)
        return {name: values.tobytes() for name, values in result.weights.items()}

    first = run(seed=3)
    assert run(seed=3) == first
    assert run(seed=4) != first


def _mnist_train():
    mnist = pytest.importorskip("weightless_cli.data.mnist")
    if not mnist.cache_path().exists():
        pytest.skip("MNIST is not cached")
    images, labels = mnist.load_mnist("train")
    return (images[:, None].astype(np.float32) / 255.0), labels.astype(np.int64)


def _mnist_mlp(hidden: int = 100) -> onnx.ModelProto:
    rng = np.random.default_rng(13)
    fc1 = _quantized(_pruned((rng.standard_normal((hidden, 784)) * 0.05).astype(np.float32), 0.8, 14), k=32)
    fc2 = (rng.standard_normal((10, hidden)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Gemm", ["f", "fc1.weight"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "fc2.weight"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mnist-mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(fc1, "fc1.weight"), numpy_helper.from_array(fc2, "fc2.weight")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_real_mnist_short_retrain_learns_and_keeps_structure() -> None:
    x, y = _mnist_train()
    train_x, train_y, held_x, held_y = x[:4096], y[:4096], x[-1000:], y[-1000:]
    model = _mnist_mlp()
    fc1 = weight_arrays(model)["fc1.weight"]
    before = _accuracy(model, held_x, held_y)
    result = retrain(model, train_x, train_y, trainable=["fc1.weight", "fc2.weight"], epochs=2, lr=3e-3)
    assert result.shared_values == {"fc1.weight": len(_distinct_nonzero(fc1))}
    assert len(_distinct_nonzero(result.weights["fc1.weight"])) == result.shared_values["fc1.weight"]
    assert np.all(result.weights["fc1.weight"][fc1 == 0] == 0)
    after = _accuracy(_with_weights(model, result.weights), held_x, held_y)
    assert after > max(0.6, before + 0.4)


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "sample_models" / "lenet5.onnx").exists(), reason="no sample model")
def test_full_mnist_epoch_of_lenet5_takes_tens_of_seconds() -> None:
    x, y = _mnist_train()
    model = onnx.load(ROOT / "sample_models" / "lenet5.onnx")
    names = [n for n, v in weight_arrays(model).items() if v.dtype == np.float32 and v.ndim >= 2]
    start = time.perf_counter()
    result = retrain(model, x, y, trainable=names, epochs=1, lr=1e-4)
    elapsed = time.perf_counter() - start
    assert elapsed < 180, f"one LeNet-5 epoch took {elapsed:.0f} s"
    assert len(result.epoch_losses) == 1
