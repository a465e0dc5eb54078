"""The ONNX weight model: discovery, roles, selection, writing back."""

import numpy as np
import onnx
import pytest

from tests import onnx_factory as factory
from weightless_cli.errors import BadInputError, UsageError
from weightless_cli.model import OnnxModel, PerTensor, Selection, WeightTensor


def test_initializers_found_with_roles(tmp_path):
    model = OnnxModel.load(factory.save(factory.mlp(), tmp_path / "m.onnx"))
    roles = {t.name: (t.role, t.ops, t.shape) for t in model.weights}
    assert roles["fc1.weight"] == ("weight", ("Gemm",), (48, 64))
    assert roles["fc1.bias"] == ("bias", ("Gemm",), (48,))
    assert [t.name for t in Selection(min_params=0).apply(model)] == ["fc1.weight", "fc2.weight"]


def test_constant_node_weight_is_found_and_written_back(tmp_path):
    path = factory.save(factory.constant_node_model(), tmp_path / "c.onnx")
    model = OnnxModel.load(path)
    (tensor,) = model.weights
    assert (tensor.name, tensor.location, tensor.role) == ("W", "constant", "weight")
    tensor.set_array(np.zeros(tensor.shape, np.float32))
    model.save(tmp_path / "out.onnx")
    again = OnnxModel.load(tmp_path / "out.onnx")
    assert not again.weights[0].array().any()
    assert [n.op_type for n in again.proto.graph.node] == ["Constant", "MatMul"]


def test_if_subgraph_weights_have_distinct_stable_names(tmp_path):
    model = OnnxModel.load(factory.save(factory.if_model(), tmp_path / "if.onnx"))
    names = sorted(t.name for t in model.weights)
    assert names == ["gate/else_branch/W", "gate/then_branch/W"]
    assert all(t.in_subgraph and t.role == "weight" for t in model.weights)


def test_external_data_is_loaded_and_kept(tmp_path):
    path = factory.save(factory.mlp(), tmp_path / "ext.onnx", external=True)
    model = OnnxModel.load(path)
    assert model.used_external_data
    expected = model.weight("fc1.weight").array().copy()
    model.save(tmp_path / "copy.onnx")
    assert (tmp_path / "copy.onnx.data").exists()
    assert not list(tmp_path.glob(".*tmp"))
    np.testing.assert_array_equal(OnnxModel.load(tmp_path / "copy.onnx").weight("fc1.weight").array(), expected)


def test_missing_external_data_is_a_one_line_error(tmp_path):
    path = factory.save(factory.mlp(), tmp_path / "ext.onnx", external=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(BadInputError, match="missing external-data file 'ext.onnx.data'"):
        OnnxModel.load(path)


def test_quantized_tensors_are_left_alone(tmp_path):
    model = OnnxModel.load(factory.save(factory.quantized_model(), tmp_path / "q.onnx"))
    assert model.quantized_ops == ["DequantizeLinear"]
    assert all(t.quantized for t in model.weights)  # the float scale feeds DequantizeLinear
    assert Selection(min_params=0).apply(model) == []


def test_shared_initializer_listed_once_with_both_readers(tmp_path):
    model = OnnxModel.load(factory.save(factory.shared_initializer_model(), tmp_path / "s.onnx"))
    (tensor,) = model.weights
    assert tensor.consumers == (("MatMul", 1), ("MatMul", 1))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_dtypes_round_trip(tmp_path, dtype):
    model = OnnxModel.load(factory.save(factory.mlp(dtype=dtype), tmp_path / "m.onnx"))
    tensor = model.weight("fc1.weight")
    assert tensor.dtype == np.dtype(dtype).name
    tensor.set_array(tensor.float_array() * 2)
    assert tensor.array().dtype == dtype


def test_bfloat16_tensor():
    import ml_dtypes

    values = factory.rng_weights((8, 4), 0).astype(ml_dtypes.bfloat16)
    tensor = WeightTensor("w", onnx.numpy_helper.from_array(values, "w"), "initializer", (("Gemm", 1),))
    assert tensor.dtype == "bfloat16" and tensor.float_array().dtype == np.float32
    tensor.set_array(tensor.float_array() * 0)
    assert tensor.proto.data_type == onnx.TensorProto.BFLOAT16 and not tensor.float_array().any()


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all", b"\x08\x07\x12\x04abcd\xff\xff"])
def test_not_onnx_is_bad_input(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(BadInputError) as info:
        OnnxModel.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_onnx_is_bad_input(tmp_path):
    data = factory.mlp().SerializeToString()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInputError):
        OnnxModel.load(path)


def test_selection_globs_and_exact_names(tmp_path):
    model = OnnxModel.load(factory.save(factory.mlp(), tmp_path / "m.onnx"))
    assert [t.name for t in Selection(("fc2*",), min_params=0).apply(model)] == ["fc2.weight"]
    assert [t.name for t in Selection(("fc1.bias",), min_params=0).apply(model)] == ["fc1.bias"]
    assert [t.name for t in Selection(exclude=("fc1*",), min_params=0).apply(model)] == ["fc2.weight"]
    with pytest.raises(UsageError, match="no weight tensor matches --layers nothing"):
        Selection(("nothing",)).apply(model)


def test_per_tensor_settings():
    settings = PerTensor.parse(("0.5", "fc*=0.7", "fc2.weight=0.9"), float, "--sparsity")
    assert settings.for_name("conv1") == 0.5
    assert settings.for_name("fc1.weight") == 0.7
    assert settings.for_name("fc2.weight") == 0.9
    with pytest.raises(UsageError, match="--sparsity 'x'"):
        PerTensor.parse(("x",), float, "--sparsity")
