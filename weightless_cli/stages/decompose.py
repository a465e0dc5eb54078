"""Low-rank decomposition of Conv, Gemm and MatMul weights (the `decompose` stage).

Unlike the other stages this one changes the graph: each chosen layer is replaced by a
chain of smaller layers that computes (an approximation of) the same thing.

* **Conv** (Tucker-2, Kim et al. 2016, "Compression of deep convolutional neural networks
  for fast and low power mobile applications"): a ``T×S×k×k`` kernel becomes a 1×1 conv
  from S to R_in channels, a ``k×k`` conv R_in→R_out with the original strides, padding
  and dilations, and a 1×1 conv from R_out to T channels that carries the bias. A conv
  whose kernel is 1×1 is a matrix and gets the cheaper two-conv truncated SVD instead.
* **Gemm / MatMul** with a constant weight: truncated SVD, ``W ≈ P·Q`` with the singular
  values split evenly between the factors, so ``x·W`` becomes ``(x·P)·Q``. Gemm keeps its
  transA/transB layout, alpha, beta and bias on the second product.

Ranks come from :class:`RankSpec`: a fixed rank, the smallest rank that keeps a share of
the singular values' energy, or empirical variational Bayesian matrix factorization
(EVBMF, Nakajima et al. 2013, "Global analytic solution of fully-observed variational
Bayesian matrix factorization", JMLR 14), which Kim et al. run on the mode unfoldings of
each kernel. A layer is replaced only when that saves parameters.

New tensors and nodes are named after the old ones (``conv2.weight`` →
``conv2.weight.tucker_first`` …); the opset and every other node stay as they were.
The pure cores (rank selection, factorizations, MAC counts) take and return numpy
arrays; :func:`decompose_model` rewrites a ModelProto; :func:`decompose_file` does the I/O.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from weightless_cli.errors import BadInputError, UsageError
from weightless_cli.model import PROTOBUF_LIMIT, OnnxModel, Selection, model_warnings

DEFAULT_LATENCY_RUNS = 20
DEFAULT_LATENCY_BATCHES = (1, 256)
DEFAULT_LATENCY_THREADS = 1
HOOI_ITERATIONS = 10
RANK_METHODS = ("vbmf", "rank", "energy")
_DEFAULT_DOMAINS = ("", "ai.onnx")

# ---------------------------------------------------------------- rank selection


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """The smallest rank whose singular values hold at least ``energy`` of the total Σσ²."""
    squares = np.asarray(singular_values, dtype=np.float64) ** 2
    total = squares.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(squares) / total
    # A tolerance so that energy=1.0 is reached despite rounding in the cumulative sum.
    return int(np.searchsorted(kept, energy - 1e-12, side="left")) + 1


def _vb_psi1(tau: np.ndarray, alpha: float) -> np.ndarray:
    """Ψ(τ) = log(τ+1) + α·log(τ/α+1) − τ, the free-energy gain of keeping one component."""
    return np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau


def vb_tau_bar(alpha: float) -> float:
    """τ̄: the positive zero of Ψ (Nakajima et al. 2013), 2.5129 at α = 1. Found by bisection,
    since Ψ rises from Ψ(0)=0 and then falls for good. With the exact zero, Ψ(τ(x̄)) = 0, so
    the free energy below is continuous at the threshold x̄ (the common 2.5129·√α shortcut
    is exact only for square matrices)."""
    low, high = 1e-12, 1.0
    while _vb_psi1(np.array(high), alpha) > 0:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if _vb_psi1(np.array(middle), alpha) > 0:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


@dataclass(frozen=True)
class EvbmfEstimate:
    """EVBMF's answer for one matrix: how many components survive, the noise variance it
    estimated, and the singular-value threshold that follows from it."""

    rank: int
    sigma2: float
    threshold: float


def evbmf(matrix: np.ndarray) -> EvbmfEstimate:
    """Empirical VBMF of a fully observed matrix: the noise variance σ² minimises the free
    energy, and every singular value above ``√(M σ² (1+τ̄)(1+α/τ̄))`` is kept."""
    values = np.asarray(matrix, dtype=np.float64)
    short, long = sorted(values.shape)  # the theory wants L ≤ M; the transpose has the same σ
    return evbmf_from_singular_values(np.linalg.svd(values, compute_uv=False), short, long)


def evbmf_from_singular_values(singular_values: np.ndarray, rows: int, cols: int) -> EvbmfEstimate:
    """EVBMF given all ``min(rows, cols)`` singular values of a ``rows × cols`` matrix."""
    s = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    short, long = min(rows, cols), max(rows, cols)
    if s.size != short:
        raise ValueError(f"expected {short} singular values, got {s.size}")
    upper = float(np.sum(s**2)) / (short * long)
    if upper <= 0:
        return EvbmfEstimate(0, 0.0, 0.0)
    alpha = short / long
    tau_bar = vb_tau_bar(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    # Bounds on the optimal σ² (Nakajima et al. 2013, Theorem 11): with H̄ = ⌈L/(1+α)⌉ − 1
    # at most H̄ components can be signal, so the rest bound the noise from below.
    h_bar = min(math.ceil(short / (1 + alpha)) - 1, short - 1)
    lower = max(s[h_bar] ** 2 / (long * x_bar), float(np.mean(s[h_bar:] ** 2)) / long)
    # An exactly low-rank matrix has lower bound 0; stay a hair above it to keep logs finite.
    lower = min(max(lower, upper * 1e-12), upper)
    sigma2 = _minimize_in_log_space(lambda sig2: _evb_free_energy(sig2, s, long, alpha, x_bar), lower, upper)
    threshold = math.sqrt(long * sigma2 * x_bar)
    return EvbmfEstimate(int(np.count_nonzero(s > threshold)), sigma2, threshold)


def _evb_free_energy(sigma2: np.ndarray, s: np.ndarray, long: int, alpha: float, x_bar: float) -> np.ndarray:
    """The EVB free energy as a function of σ² (constants dropped), for a vector of σ².

    Ω(σ²) = Σ_h [x_h − log x_h] + Σ_{x_h > x̄} Ψ(τ(x_h)),  x_h = γ_h² / (M σ²),
    with −Σ log x_h written as L·log σ² + const so that zero singular values are harmless.
    """
    x = s[None, :] ** 2 / (long * sigma2[:, None])
    kept = x > x_bar
    shifted = np.where(kept, x - (1 + alpha), 0.0)
    tau = 0.5 * (shifted + np.sqrt(np.maximum(shifted**2 - 4 * alpha, 0.0)))
    gain = np.where(kept, _vb_psi1(np.where(kept, tau, 1.0), alpha), 0.0)
    return x.sum(axis=1) + s.size * np.log(sigma2) + gain.sum(axis=1)


def _minimize_in_log_space(objective: Callable[[np.ndarray], np.ndarray], low: float, high: float,
                           grid: int = 257, iterations: int = 80) -> float:
    """Minimise a scalar function on [low, high]: a log-spaced grid finds the basin (the free
    energy has kinks where components switch on), golden-section search refines it."""
    if high <= low:
        return high
    logs = np.linspace(math.log(low), math.log(high), grid)
    best = int(np.argmin(objective(np.exp(logs))))
    a, b = logs[max(best - 1, 0)], logs[min(best + 1, grid - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    f_c, f_d = objective(np.exp(np.array([c, d])))
    for _ in range(iterations):
        if f_c <= f_d:
            b, d, f_d = d, c, f_c
            c = b - ratio * (b - a)
            f_c = objective(np.exp(np.array([c])))[0]
        else:
            a, c, f_c = c, d, f_d
            d = a + ratio * (b - a)
            f_d = objective(np.exp(np.array([d])))[0]
    candidates = np.array([logs[best], c, d])
    return float(np.exp(candidates[int(np.argmin(objective(np.exp(candidates))))]))


@dataclass(frozen=True)
class RankSpec:
    """How ranks are chosen: ``vbmf`` (EVBMF), ``rank`` (a fixed R) or ``energy`` (share of Σσ²)."""

    method: str = "vbmf"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.method not in RANK_METHODS:
            raise UsageError(f"unknown rank method {self.method!r} (expected one of {', '.join(RANK_METHODS)})")
        if self.method == "rank" and (self.value is None or self.value < 1 or self.value != int(self.value)):
            raise UsageError(f"--rank must be a whole number >= 1, got {self.value}")
        if self.method == "energy" and (self.value is None or not 0 < self.value <= 1):
            raise UsageError(f"--energy must be in (0, 1], got {self.value}")

    @classmethod
    def parse(cls, rank: int | None = None, energy: float | None = None, vbmf: bool = False) -> RankSpec:
        """From the CLI options --rank R / --energy E / --vbmf (at most one; VBMF by default)."""
        given = [flag for flag, on in (("--rank", rank is not None), ("--energy", energy is not None),
                                       ("--vbmf", vbmf)) if on]
        if len(given) > 1:
            raise UsageError(f"give only one of --rank, --energy, --vbmf (got {' and '.join(given)})")
        if rank is not None:
            return cls("rank", rank)
        if energy is not None:
            return cls("energy", energy)
        return cls("vbmf")

    def describe(self) -> str:
        if self.method == "rank":
            return f"rank {int(self.value)}"
        return f"energy {self.value:g}" if self.method == "energy" else "EVBMF"

    def choose(self, matrix: np.ndarray) -> int:
        """The rank for ``matrix`` (a weight, or a kernel unfolding), between 1 and min(shape)."""
        limit = min(matrix.shape)
        if self.method == "rank":
            return min(int(self.value), limit)
        if self.method == "energy":
            return min(energy_rank(np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False), self.value), limit)
        return min(max(evbmf(matrix).rank, 1), limit)


# ---------------------------------------------------------------- factorizations


def _fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so its largest-magnitude entry is positive: SVD signs are arbitrary,
    and this makes the factors the same whatever LAPACK chose."""
    rows = np.argmax(np.abs(vectors), axis=0)
    signs = np.sign(vectors[rows, np.arange(vectors.shape[1])])
    return vectors * np.where(signs == 0, 1.0, signs)


def _leading_left_vectors(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, _, _ = np.linalg.svd(matrix, full_matrices=False)
    return _fix_signs(u[:, :rank])


def svd_factors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``matrix`` [K, N] ≈ first [K, r] @ second [r, N] (float64), the singular values split
    as √σ into both factors so that neither dominates when they are retrained."""
    u, s, vt = np.linalg.svd(np.asarray(matrix, dtype=np.float64), full_matrices=False)
    u_fixed = _fix_signs(u[:, :rank])
    flips = np.sign(np.sum(u_fixed * u[:, :rank], axis=0))  # the same flips for the rows of vt
    root = np.sqrt(s[:rank])
    return u_fixed * root, (vt[:rank] * flips[:, None]) * root[:, None]


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Mode-``mode`` unfolding: that axis becomes the rows, all others the columns."""
    return np.moveaxis(tensor, mode, 0).reshape(tensor.shape[mode], -1)


@dataclass(frozen=True)
class Tucker2:
    """A conv kernel W [T, S, *k] ≈ core ×₀ U_out ×₁ U_in, stored as three conv kernels."""

    first: np.ndarray  # [R_in, S, 1, …]: U_inᵀ, mixes the input channels down
    core: np.ndarray  # [R_out, R_in, *k]: the spatial convolution
    last: np.ndarray  # [T, R_out, 1, …]: U_out, mixes back up to the output channels

    def reconstruct(self) -> np.ndarray:
        u_in = self.first.reshape(self.first.shape[:2]).T
        u_out = self.last.reshape(self.last.shape[:2])
        return np.einsum("rq...,tr,sq->ts...", self.core, u_out, u_in)


def tucker2(kernel: np.ndarray, rank_out: int, rank_in: int, iterations: int = HOOI_ITERATIONS) -> Tucker2:
    """Tucker-2 of a conv kernel on its channel modes: HOSVD, refined by higher-order
    orthogonal iteration (HOOI) when a rank is truncated. Exact at full ranks."""
    w = np.asarray(kernel, dtype=np.float64)
    out_channels, in_channels, spatial = w.shape[0], w.shape[1], w.shape[2:]
    u_out = _leading_left_vectors(unfold(w, 0), rank_out)
    u_in = _leading_left_vectors(unfold(w, 1), rank_in)
    if rank_out < out_channels or rank_in < in_channels:
        for _ in range(iterations):
            u_out = _leading_left_vectors(unfold(np.einsum("ts...,sq->tq...", w, u_in), 0), rank_out)
            u_in = _leading_left_vectors(unfold(np.einsum("ts...,tr->rs...", w, u_out), 1), rank_in)
    core = np.einsum("ts...,tr,sq->rq...", w, u_out, u_in)
    ones = (1,) * len(spatial)
    return Tucker2(first=u_in.T.reshape(rank_in, in_channels, *ones), core=core,
                   last=u_out.reshape(out_channels, rank_out, *ones))


def tucker2_ranks(kernel: np.ndarray, spec: RankSpec) -> tuple[int, int]:
    """(R_out, R_in) for a conv kernel: the spec applied to the mode-0 and mode-1 unfoldings."""
    return spec.choose(unfold(kernel, 0)), spec.choose(unfold(kernel, 1))


# ---------------------------------------------------------------- multiply-adds


def node_macs(model: onnx.ModelProto) -> list[int | None]:
    """Multiply-adds of each main-graph node for one sample (0 for ops other than Conv,
    ConvTranspose, Gemm and MatMul; None where shape inference leaves a size unknown)."""
    fixed, batch = _with_unit_batch(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed)
    except Exception:  # an uninferable graph: sizes unknown, not an error of this stage
        return [None if n.op_type in _MAC_OPS else 0 for n in model.graph.node]
    shapes = _known_shapes(inferred.graph)
    macs = []
    for node in inferred.graph.node:
        value = _MAC_OPS[node.op_type](node, shapes) if node.op_type in _MAC_OPS else 0
        macs.append(None if value is None else value // batch)
    return macs


def total_macs(model: onnx.ModelProto) -> int | None:
    counts = node_macs(model)
    return None if any(c is None for c in counts) else int(sum(counts))


def _with_unit_batch(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy whose free batch dimensions are 1, and the batch the graph insists on otherwise."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    initializers = {t.name for t in copy.graph.initializer}
    batch = 1
    for value in copy.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in initializers or not dims:
            continue
        if dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            batch = max(batch, dims[0].dim_value)
        else:
            dims[0].Clear()
            dims[0].dim_value = 1
    return copy, batch


def _known_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(int(d) for d in attr.t.dims)
    return shapes


def _conv_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    out, kernel = shapes.get(node.output[0]), shapes.get(node.input[1])
    return None if out is None or kernel is None else math.prod(out) * math.prod(kernel[1:])


def _conv_transpose_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    x, kernel = shapes.get(node.input[0]), shapes.get(node.input[1])
    return None if x is None or kernel is None else math.prod(x) * math.prod(kernel[1:])


def _gemm_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    out, a = shapes.get(node.output[0]), shapes.get(node.input[0])
    if out is None or a is None:
        return None
    trans_a = next((helper.get_attribute_value(x) for x in node.attribute if x.name == "transA"), 0)
    return math.prod(out) * a[0 if trans_a else 1]


def _matmul_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    out, a = shapes.get(node.output[0]), shapes.get(node.input[0])
    return None if out is None or a is None else math.prod(out) * a[-1]


_MAC_OPS = {"Conv": _conv_macs, "ConvTranspose": _conv_transpose_macs, "Gemm": _gemm_macs, "MatMul": _matmul_macs}


# ---------------------------------------------------------------- graph rewriting


@dataclass
class _Replacement:
    """What replaces one node: new nodes (in order), their new initializers, and what to report."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    kind: str
    ranks: list[int]
    params_after: int


@dataclass
class _Graph:
    """Lookups over a main graph that the rewrite needs."""

    model: onnx.ModelProto
    stored: dict[str, onnx.TensorProto] = field(default_factory=dict)  # initializers and Constant values
    readers: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    outer_readers: set[str] = field(default_factory=set)  # read from a subgraph or a graph output
    taken: set[str] = field(default_factory=set)  # every name in use, so new ones never clash

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Graph:
        graph = cls(model)
        g = model.graph
        graph.stored.update((init.name, init) for init in g.initializer)
        for index, node in enumerate(g.node):
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                for attr in node.attribute:
                    if attr.name == "value":
                        graph.stored[node.output[0]] = attr.t
            for position, name in enumerate(node.input):
                graph.readers[name].append((index, position))
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    graph.outer_readers.update(_names_read_in(sub))
            graph.taken.update([node.name, *node.input, *node.output])
        graph.outer_readers.update(o.name for o in g.output)
        graph.taken.update(t.name for t in g.initializer)
        graph.taken.update(v.name for v in [*g.input, *g.output, *g.value_info])
        return graph

    def fresh(self, name: str) -> str:
        candidate, counter = name, 1
        while candidate in self.taken:
            candidate, counter = f"{name}_{counter}", counter + 1
        self.taken.add(candidate)
        return candidate

    def value(self, name: str) -> np.ndarray:
        """A stored tensor's values (converted only when a layer is planned: models can be big)."""
        return numpy_helper.to_array(self.stored[name])

    def tensor(self, values: np.ndarray, name: str, like: str) -> onnx.TensorProto:
        """An initializer holding ``values`` in the dtype of tensor ``like``."""
        dtype = helper.tensor_dtype_to_np_dtype(self.stored[like].data_type)
        return numpy_helper.from_array(np.asarray(values).astype(dtype), self.fresh(name))


def _names_read_in(graph: onnx.GraphProto) -> set[str]:
    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names |= _names_read_in(sub)
    return names


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _node_id(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


class _Skip(Exception):
    """This layer is left as it is, for the reason given."""


def _plan(graph: _Graph, name: str, spec: RankSpec) -> tuple[int, _Replacement]:
    """(index of the node that reads weight ``name``, what replaces it); raises _Skip with
    the reason when that layer cannot be decomposed."""
    if name not in graph.stored:
        raise _Skip("not a main-graph initializer or Constant (inside a subgraph?)")
    readers = graph.readers.get(name, [])
    if name in graph.outer_readers or len(readers) != 1:
        raise _Skip(f"read by {len(readers) + (name in graph.outer_readers)} places; only a weight used once is decomposed")
    index, position = readers[0]
    node = graph.model.graph.node[index]
    if node.domain not in _DEFAULT_DOMAINS:
        raise _Skip(f"read by {node.domain}:{node.op_type}")
    planner = _PLANNERS.get(node.op_type)
    if planner is None:
        raise _Skip(f"{node.op_type} layers are not decomposed (only Conv, Gemm, MatMul)")
    return index, planner(graph, node, position, name, spec)


def _plan_conv(graph: _Graph, node: onnx.NodeProto, position: int, name: str, spec: RankSpec) -> _Replacement:
    if position != 1:
        raise _Skip(f"Conv reads it as input {position}, not as its kernel")
    attrs = _attrs(node)
    if attrs.get("group", 1) != 1:
        raise _Skip("grouped convolution")
    kernel = graph.value(name)
    if kernel.ndim < 3:
        raise _Skip(f"kernel of shape {list(kernel.shape)}")
    if math.prod(kernel.shape[2:]) == 1:
        return _plan_pointwise_conv(graph, node, name, kernel, spec)
    rank_out, rank_in = tucker2_ranks(kernel, spec)
    factors = tucker2(kernel, rank_out, rank_in)
    base, ones = _node_id(node), [1] * (kernel.ndim - 2)
    first = graph.tensor(factors.first, f"{name}.tucker_first", name)
    core = graph.tensor(factors.core, f"{name}.tucker_core", name)
    last = graph.tensor(factors.last, f"{name}.tucker_last", name)
    mid_in, mid_out = graph.fresh(f"{node.output[0]}.tucker_first"), graph.fresh(f"{node.output[0]}.tucker_core")
    core_attrs = {**attrs, "group": 1}
    if "kernel_shape" in core_attrs:
        core_attrs["kernel_shape"] = list(kernel.shape[2:])
    nodes = [
        helper.make_node("Conv", [node.input[0], first.name], [mid_in], graph.fresh(f"{base}.tucker_first"),
                         kernel_shape=ones),
        helper.make_node("Conv", [mid_in, core.name], [mid_out], graph.fresh(f"{base}.tucker_core"), **core_attrs),
        helper.make_node("Conv", [mid_out, last.name, *node.input[2:]], list(node.output),
                         graph.fresh(f"{base}.tucker_last"), kernel_shape=ones),
    ]
    params = factors.first.size + factors.core.size + factors.last.size
    return _Replacement(nodes, [first, core, last], "tucker2", [rank_in, rank_out], params)


def _plan_pointwise_conv(graph: _Graph, node: onnx.NodeProto, name: str, kernel: np.ndarray,
                         spec: RankSpec) -> _Replacement:
    """A 1×1 conv is a channel-mixing matrix [T, S]: two 1×1 convs from its truncated SVD.
    The first keeps the original strides/padding (it has no bias, so padded zeros stay zero)."""
    out_channels, in_channels, ones = kernel.shape[0], kernel.shape[1], [1] * (kernel.ndim - 2)
    matrix = kernel.reshape(out_channels, in_channels)
    rank = spec.choose(matrix)
    up, down = svd_factors(matrix, rank)  # matrix ≈ up [T, r] @ down [r, S]
    base = _node_id(node)
    first = graph.tensor(down.reshape(rank, in_channels, *ones), f"{name}.svd_first", name)
    last = graph.tensor(up.reshape(out_channels, rank, *ones), f"{name}.svd_last", name)
    middle = graph.fresh(f"{node.output[0]}.svd_first")
    nodes = [
        helper.make_node("Conv", [node.input[0], first.name], [middle], graph.fresh(f"{base}.svd_first"),
                         **_attrs(node)),
        helper.make_node("Conv", [middle, last.name, *node.input[2:]], list(node.output),
                         graph.fresh(f"{base}.svd_last"), kernel_shape=ones),
    ]
    return _Replacement(nodes, [first, last], "svd", [rank], up.size + down.size)


def _plan_gemm(graph: _Graph, node: onnx.NodeProto, position: int, name: str, spec: RankSpec) -> _Replacement:
    if position != 1:
        raise _Skip("Gemm reads it as operand A or the bias; only a constant B is decomposed")
    if _opset(graph.model) < 11:
        raise _Skip("Gemm before opset 11 needs a bias on every product")
    attrs = _attrs(node)
    trans_a, trans_b = attrs.get("transA", 0), attrs.get("transB", 0)
    weight = graph.value(name)
    matrix = weight.T if trans_b else weight  # the [K, N] operand of A'·B'
    rank = spec.choose(matrix)
    first, second = svd_factors(matrix, rank)
    # Keep the model's storage layout: with transB=1 both factors are stored transposed too.
    first_t = graph.tensor(first.T if trans_b else first, f"{name}.svd_first", name)
    second_t = graph.tensor(second.T if trans_b else second, f"{name}.svd_last", name)
    base, middle = _node_id(node), graph.fresh(f"{node.output[0]}.svd_first")
    last_attrs = {k: v for k, v in attrs.items() if k in ("alpha", "beta")}
    nodes = [
        helper.make_node("Gemm", [node.input[0], first_t.name], [middle], graph.fresh(f"{base}.svd_first"),
                         transA=trans_a, transB=trans_b),
        helper.make_node("Gemm", [middle, second_t.name, *node.input[2:]], list(node.output),
                         graph.fresh(f"{base}.svd_last"), transB=trans_b, **last_attrs),
    ]
    return _Replacement(nodes, [first_t, second_t], "svd", [rank], first.size + second.size)


def _plan_matmul(graph: _Graph, node: onnx.NodeProto, position: int, name: str, spec: RankSpec) -> _Replacement:
    weight = graph.value(name)
    if weight.ndim != 2:
        raise _Skip(f"MatMul weight of shape {list(weight.shape)} (only 2-D is decomposed)")
    rank = spec.choose(weight)
    left, right = svd_factors(weight, rank)  # weight ≈ left @ right
    base, middle = _node_id(node), graph.fresh(f"{node.output[0]}.svd_first")
    data = node.input[1 - position]
    if position == 1:  # x·W = (x·left)·right
        first = graph.tensor(left, f"{name}.svd_first", name)
        last = graph.tensor(right, f"{name}.svd_last", name)
        inputs_first, inputs_last = [data, first.name], [middle, last.name]
    else:  # W·x = left·(right·x)
        first = graph.tensor(right, f"{name}.svd_first", name)
        last = graph.tensor(left, f"{name}.svd_last", name)
        inputs_first, inputs_last = [first.name, data], [last.name, middle]
    nodes = [
        helper.make_node("MatMul", inputs_first, [middle], graph.fresh(f"{base}.svd_first")),
        helper.make_node("MatMul", inputs_last, list(node.output), graph.fresh(f"{base}.svd_last")),
    ]
    return _Replacement(nodes, [first, last], "svd", [rank], left.size + right.size)


_PLANNERS = {"Conv": _plan_conv, "Gemm": _plan_gemm, "MatMul": _plan_matmul}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 1)


def decompose_model(model: onnx.ModelProto, names: Sequence[str], spec: RankSpec, *,
                    only_if_smaller: bool = True) -> tuple[onnx.ModelProto, list[dict]]:
    """A copy of ``model`` with the layers reading the weights ``names`` decomposed, and one
    report row per name, in the order given: decomposed or not, and why not. Every row has
    the same keys (None where unknown). ``only_if_smaller=False`` also replaces layers whose
    factors are not smaller (for exactness checks at full rank)."""
    graph = _Graph.of(model)
    rows = [_layer_row(graph, name) for name in names]
    replacements: dict[int, tuple[str, _Replacement]] = {}
    replaced_rows: dict[int, dict] = {}
    for row in rows:
        try:
            index, replacement = _plan(graph, row["tensor"], spec)
        except _Skip as reason:
            row["reason"] = str(reason)
            continue
        if index in replacements:
            row["reason"] = f"its layer {row['node']!r} is already decomposed"
            continue
        row.update(kind=replacement.kind, ranks=replacement.ranks, params_after=replacement.params_after)
        if only_if_smaller and replacement.params_after >= row["params_before"]:
            row["reason"] = (f"no saving at rank {replacement.ranks} ({replacement.params_after:,} params "
                             f"vs {row['params_before']:,})")
            continue
        row["decomposed"] = True
        replacements[index], replaced_rows[index] = (row["tensor"], replacement), row
    result = _rewrite(model, replacements)
    _fill_macs(model, result, replaced_rows, replacements)
    return result, rows


def _layer_row(graph: _Graph, name: str) -> dict:
    """The report row of one weight before planning: what is known from the graph alone."""
    stored = graph.stored.get(name)
    dims = None if stored is None else [int(d) for d in stored.dims]
    readers = graph.readers.get(name, [])
    node = graph.model.graph.node[readers[0][0]] if len(readers) == 1 else None
    return {"tensor": name, "node": None if node is None else _node_id(node),
            "op": None if node is None else node.op_type, "shape": dims, "kind": None, "ranks": None,
            "params_before": None if dims is None else math.prod(dims), "params_after": None,
            "macs_before": None, "macs_after": None, "decomposed": False, "reason": ""}


def _rewrite(model: onnx.ModelProto, replacements: dict[int, tuple[str, _Replacement]]) -> onnx.ModelProto:
    result = onnx.ModelProto()
    result.CopyFrom(model)
    g = result.graph
    nodes = []
    for index, node in enumerate(model.graph.node):
        nodes.extend(replacements[index][1].nodes if index in replacements else [node])
    replaced = {name for name, _ in replacements.values()}
    # The old weights are read by nobody now (only single-use weights are decomposed).
    nodes = [n for n in nodes if not (n.op_type == "Constant" and n.output and n.output[0] in replaced)]
    del g.node[:]
    g.node.extend(nodes)
    kept = [t for t in g.initializer if t.name not in replaced]
    new = [t for _, r in sorted(replacements.items()) for t in r[1].initializers]
    del g.initializer[:]
    g.initializer.extend(kept + new)
    for field_name in ("input", "value_info"):
        entries = [v for v in getattr(g, field_name) if v.name not in replaced]
        del getattr(g, field_name)[:]
        getattr(g, field_name).extend(entries)
    return result


def _fill_macs(before: onnx.ModelProto, after: onnx.ModelProto, rows: dict[int, dict],
               replacements: dict[int, tuple[str, _Replacement]]) -> None:
    macs_before, macs_after = node_macs(before), node_macs(after)
    position = 0  # where the current original node's replacement starts in the new graph
    replaced = {name for name, _ in replacements.values()}
    for index, node in enumerate(before.graph.node):
        if node.op_type == "Constant" and node.output and node.output[0] in replaced:
            continue  # dropped by the rewrite
        width = len(replacements[index][1].nodes) if index in replacements else 1
        if index in rows:
            new = macs_after[position : position + width]
            rows[index]["macs_before"] = macs_before[index]
            rows[index]["macs_after"] = None if any(m is None for m in new) else int(sum(new))
        position += width
    assert position == len(after.graph.node), "rewrite and MAC bookkeeping disagree"


def passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def check_model(model: onnx.ModelProto, path: object, full_check: bool = True) -> None:
    """The rewritten graph must pass the ONNX checker, with strict shape inference when
    ``full_check`` (the caller asks for it when the original graph passed it too)."""
    if model.ByteSize() > PROTOBUF_LIMIT:
        return  # the checker cannot serialise it
    try:
        onnx.checker.check_model(model, full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise BadInputError(f"the decomposed graph fails the ONNX checker: {first_line}", path) from None


# ---------------------------------------------------------------- latency


@dataclass(frozen=True)
class Latency:
    """Milliseconds per run: the median, and the fastest run (robust when other processes
    preempt some runs, as on a busy machine, where the median can flip between modes)."""

    median_ms: float
    min_ms: float


def measure_latency(model: bytes, batch_sizes: Sequence[int] = DEFAULT_LATENCY_BATCHES,
                    runs: int = DEFAULT_LATENCY_RUNS, threads: int = DEFAULT_LATENCY_THREADS,
                    seed: int = 0) -> dict[int, Latency] | None:
    """onnxruntime latency of one model per batch size; see :func:`measure_latencies`."""
    return measure_latencies([model], batch_sizes, runs, threads, seed)[0]


def measure_latencies(models: Sequence[bytes], batch_sizes: Sequence[int] = DEFAULT_LATENCY_BATCHES,
                      runs: int = DEFAULT_LATENCY_RUNS, threads: int = DEFAULT_LATENCY_THREADS,
                      seed: int = 0) -> list[dict[int, Latency] | None]:
    """onnxruntime latency per batch size for each model (CPU,
    ``threads`` threads, sequential, full graph optimization, two warm-up runs), on the same
    random inputs. The models take turns run by run, so that load from other processes
    falls on all of them alike and before/after stay comparable on a shared machine.

    A model with a fixed batch is timed at that batch only. None for a model whose single
    data input has other free dimensions, or that has several inputs.
    """
    runners = [_LatencyRunner(model, threads) for model in models]
    samples: list[dict[int, list[float]]] = [{} for _ in models]
    for batch in sorted({b for r in runners for b in r.batches(batch_sizes)}):
        takers = [(i, r) for i, r in enumerate(runners) if batch in r.batches(batch_sizes)]
        feeds = [(i, r, r.feed(np.random.default_rng(seed).standard_normal((batch, *r.sample_shape))))
                 for i, r in takers]
        for i, runner, feed in feeds:
            samples[i][batch] = []
            for _ in range(2):
                runner.session.run(None, feed)
        for _ in range(runs):
            for i, runner, feed in feeds:
                start = time.perf_counter()
                runner.session.run(None, feed)
                samples[i][batch].append(time.perf_counter() - start)
    return [None if not r.measurable else
            {b: Latency(1000.0 * float(np.median(t)), 1000.0 * min(t)) for b, t in sorted(s.items())}
            for r, s in zip(runners, samples, strict=True)]


class _LatencyRunner:
    """An onnxruntime session for timing, and the input shape it accepts."""

    def __init__(self, model: bytes, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        shape = list(inputs[0].shape) if len(inputs) == 1 else []
        self.measurable = (len(inputs) == 1 and inputs[0].type in _FLOAT_INPUTS and bool(shape)
                           and all(isinstance(d, int) and d > 0 for d in shape[1:]))
        self.sample_shape = tuple(shape[1:]) if self.measurable else ()
        self.fixed_batch = shape[0] if self.measurable and isinstance(shape[0], int) and shape[0] > 0 else None
        self.input_name = inputs[0].name if inputs else ""
        self.dtype = _FLOAT_INPUTS.get(inputs[0].type) if inputs else None

    def batches(self, wanted: Sequence[int]) -> tuple[int, ...]:
        if not self.measurable:
            return ()
        return (self.fixed_batch,) if self.fixed_batch else tuple(wanted)

    def feed(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {self.input_name: x.astype(self.dtype)}


_FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


# ---------------------------------------------------------------- the file stage


def model_params(model: OnnxModel) -> int:
    return int(sum(t.params for t in model.weights))


def decompose_file(source: Path, target: Path, selection: Selection, rank_spec: RankSpec, *,
                   latency_runs: int = DEFAULT_LATENCY_RUNS, batch_sizes: Sequence[int] = DEFAULT_LATENCY_BATCHES,
                   threads: int = DEFAULT_LATENCY_THREADS) -> dict:
    """Decompose the selected layers of ``source`` into ``target`` and report per layer and
    for the whole model: params, MACs, and onnxruntime latency before/after (median and
    fastest of ``latency_runs`` runs per batch size, one thread; ``latency_runs=0`` skips it)."""
    model = OnnxModel.load(source)
    names = [t.name for t in selection.apply(model)]
    proto, layers = decompose_model(model.proto, names, rank_spec)
    check_model(proto, target, full_check=model.proto.ByteSize() <= PROTOBUF_LIMIT and passes_full_check(model.proto))
    result = OnnxModel.from_proto(proto, target)
    result.used_external_data = model.used_external_data
    result.save(target)
    summary = {"params_before": model_params(model), "params_after": model_params(result),
               "macs_before": total_macs(model.proto), "macs_after": total_macs(proto)}
    if latency_runs > 0 and max(model.proto.ByteSize(), proto.ByteSize()) <= PROTOBUF_LIMIT:
        before, after = measure_latencies([model.proto.SerializeToString(), proto.SerializeToString()],
                                          batch_sizes, latency_runs, threads)
        for when, timings in (("before", before), ("after", after)):
            summary[f"latency_ms_{when}"] = _by_batch_name(timings, "median_ms")
            summary[f"latency_min_ms_{when}"] = _by_batch_name(timings, "min_ms")
    warnings = model_warnings(model)
    if not any(layer["decomposed"] for layer in layers):
        warnings.append(f"{source}: no layer was decomposed (see the reasons); the output computes the same graph")
    return {"input": str(source), "output": str(target), "method": rank_spec.describe(),
            "layers": layers, "model": summary, "warnings": warnings}


def _by_batch_name(timings: dict[int, Latency] | None, statistic: str) -> dict[str, float] | None:
    """One statistic per batch size, JSON-ready (batch sizes as string keys)."""
    return None if timings is None else {str(batch): getattr(ms, statistic) for batch, ms in timings.items()}
