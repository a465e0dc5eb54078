"""Write a synthetic ONNX model bigger than protobuf's 2 GiB limit, with external data.

The model is a chain of square layers (Gemm with bias, then MatMul, alternating, Relu in
between) on a [N, WIDTH] float input; weights are seeded normal values. The data file is
written tensor by tensor in small row chunks, so generating needs a few MiB of memory
whatever the size. Same arguments, same bytes.

Run: .venv/bin/python scripts/make_big_model.py OUT.onnx [--gb 2.2] [--width 8192] [--seed 0]
(--gb counts GiB of weights; OUT.onnx.data is written beside OUT.onnx.)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from weightless_cli.fileio import atomic_output

ROWS_PER_CHUNK = 256
ALIGN = 4096  # every tensor starts on a page boundary, as weightless itself writes big tensors
OPSET = 17


def layer_count(gib: float, width: int) -> int:
    return max(1, math.ceil(gib * 2**30 / (width * width * 4)))


def _external(name: str, dims: list[int], data_name: str, offset: int, length: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _write_tensor(out, rng: np.random.Generator, rows: int, cols: int, scale: float) -> tuple[int, int]:
    """Append a rows x cols float32 tensor (page-aligned); return its (offset, length)."""
    out.write(bytes(-out.tell() % ALIGN))
    offset = out.tell()
    for start in range(0, rows, ROWS_PER_CHUNK):
        chunk = rng.standard_normal((min(ROWS_PER_CHUNK, rows - start), cols), dtype=np.float32)
        chunk *= np.float32(scale)
        out.write(chunk.tobytes())
    return offset, rows * cols * 4


def make_big_model(path: Path, gib: float, width: int, seed: int = 0) -> onnx.ModelProto:
    """Write ``path`` and ``path.data``; return the (data-less) model that was written."""
    data_name = f"{path.name}.data"
    layers = layer_count(gib, width)
    nodes, initializers = [], []
    current = "input"
    with atomic_output(path) as model_tmp, atomic_output(path.parent / data_name) as data_tmp:
        with open(data_tmp, "wb") as out:
            for index in range(layers):
                rng = np.random.default_rng([seed, index])
                name = f"layer{index}"
                offset, length = _write_tensor(out, rng, width, width, 1 / math.sqrt(width))
                weight = _external(f"{name}.weight", [width, width], data_name, offset, length)
                initializers.append(weight)
                output = f"{name}.out"
                if index % 2 == 0:
                    offset, length = _write_tensor(out, rng, 1, width, 0.01)
                    initializers.append(_external(f"{name}.bias", [width], data_name, offset, length))
                    nodes.append(helper.make_node("Gemm", [current, weight.name, f"{name}.bias"], [output],
                                                  transB=1, name=name))
                else:
                    nodes.append(helper.make_node("MatMul", [current, weight.name], [output], name=name))
                current = output
                if index < layers - 1:
                    nodes.append(helper.make_node("Relu", [current], [f"{name}.relu"]))
                    current = f"{name}.relu"
        nodes.append(helper.make_node("Identity", [current], ["logits"]))
        graph = helper.make_graph(
            nodes, "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", width])], initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="weightless make_big_model")
        model.ir_version = 8
        model_tmp.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))  # by path: the checker also finds the data file
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--gb", type=float, default=2.2, help="GiB of weights (default 2.2)")
    parser.add_argument("--width", type=int, default=8192, help="layer width (default 8192: 256 MiB per layer)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.gb <= 0 or args.width < 1:
        parser.error("--gb and --width must be positive")
    if not args.output.parent.is_dir():
        parser.error(f"{args.output.parent}: output folder does not exist")
    model = make_big_model(args.output, args.gb, args.width, args.seed)
    data = args.output.parent / f"{args.output.name}.data"
    print(f"{args.output}: {len(model.graph.initializer)} tensors, {data.stat().st_size / 2**30:.2f} GiB in {data}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
