"""The sample models: clean graphs, and exactly the accuracy and sha256 their card states.

The expected figures live in one place, the card (sample_models/README.md); this test
parses its summary table, so a retrained model or an edited card that disagree fail here.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from weightless_cli.data import Dataset
from weightless_cli.stages.evaluate import evaluate, predict

SAMPLE_MODELS = Path(__file__).resolve().parent.parent / "sample_models"
CARD = SAMPLE_MODELS / "README.md"
ROW = re.compile(
    r"^\|\s*[^|]+\|\s*`(?P<file>[\w.-]+\.onnx)`\s*\|\s*(?P<params>[\d,]+)\s*\|\s*(?P<error>\d+\.\d\d) %\s*\|"
    r"\s*(?P<misses>[\d,]+) / 10,000\s*\|\s*`(?P<sha>[0-9a-f]{64})`\s*\|\s*$"
)

# What each model must look like; the figures to measure come from the card.
EXPECTED_LAYERS = {
    "lenet-300-100.onnx": ["fc1", "fc2", "fc3"],
    "lenet5.onnx": ["conv1", "conv2", "fc1", "fc2"],
    "digit-recognizer.onnx": ["conv1", "conv2", "conv3", "fc1", "fc2"],
}
TARGET_ERROR_PCT = {"lenet-300-100.onnx": 1.8, "lenet5.onnx": 0.8, "digit-recognizer.onnx": 1.0}
ALLOWED_OPS = {"Conv", "Relu", "MaxPool", "Flatten", "Gemm", "Sub", "Div"}


def card_rows() -> dict[str, dict[str, str]]:
    rows = {}
    for line in CARD.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            rows[match["file"]] = match.groupdict()
    return rows


def weight_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name.endswith((".weight", ".bias")))


def test_card_lists_every_model_file() -> None:
    assert set(card_rows()) == set(EXPECTED_LAYERS) == {p.name for p in SAMPLE_MODELS.glob("*.onnx")}


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_card_sha256_and_params_match_the_file(name: str) -> None:
    row = card_rows()[name]
    data = (SAMPLE_MODELS / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == row["sha"]
    assert weight_count(onnx.load_from_string(data)) == int(row["params"].replace(",", ""))


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_graph_is_clean_and_as_specified(name: str) -> None:
    model = onnx.load(SAMPLE_MODELS / name)
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (data_input,) = model.graph.input
    (output,) = model.graph.output
    assert data_input.name == "input" and output.name == "logits"
    dims = data_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]  # dynamic batch
    assert output.type.tensor_type.shape.dim[1].dim_value == 10
    assert {node.op_type for node in model.graph.node} <= ALLOWED_OPS
    assert all(t.data_location == onnx.TensorProto.DEFAULT and not t.external_data for t in model.graph.initializer)
    layers = EXPECTED_LAYERS[name]
    weights = {f"{layer}.{kind}" for layer in layers for kind in ("weight", "bias")}
    assert weights <= {t.name for t in model.graph.initializer}
    gemm_weights = [n.input[1] for n in model.graph.node if n.op_type == "Gemm"]
    assert gemm_weights == [f"{layer}.weight" for layer in layers if layer.startswith("fc")]


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_any_batch_size_gives_the_same_logits(name: str, mnist_test: Dataset) -> None:
    path = SAMPLE_MODELS / name
    x = mnist_test.x[:5]
    one_by_one = np.concatenate([predict(path, x[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(predict(path, x), one_by_one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_test_error_is_what_the_card_says(name: str, mnist_test: Dataset) -> None:
    row = card_rows()[name]
    result = evaluate(SAMPLE_MODELS / name, mnist_test)
    misses = round(result.error * result.samples)
    assert result.samples == 10_000
    assert misses == int(row["misses"].replace(",", ""))
    assert f"{100 * result.error:.2f}" == row["error"]
    assert 100 * result.error <= TARGET_ERROR_PCT[name]
