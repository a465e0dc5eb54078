"""Tests for the exact clustered-tensor codecs ``sparse``, ``csr-huffman`` and ``dense``.

Round trips (hypothesis, every candidate layout of ``sparse``, through the .wl container), determinism,
sizes against the order-0 bound on random masks and on a real pruned LeNet layer, Deep Compression's
filler zeros and canonical Huffman codes, and corrupt or forged input (only ever a one-line
BadInputError, or a valid index array).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightless_cli.codecs import csr_huffman, dense, entropy, sparse
from weightless_cli.codecs.clustered import SparseCode, sparse_code, values_from_ids
from weightless_cli.codecs.container import (
    Blob,
    TensorRecord,
    array_to_bytes,
    bytes_to_array,
    read_blob,
    write_blob,
)
from weightless_cli.errors import BadInputError

CODECS = {"sparse": sparse, "csr-huffman": csr_huffman, "dense": dense}
LENET = Path(__file__).resolve().parents[1] / "sample_models" / "lenet-300-100.onnx"


def make_code(shape: tuple[int, ...], k: int, density: float, seed: int, dead_rows: float = 0.0,
              dead_cols: float = 0.0, row_spread: float = 0.0) -> SparseCode:
    """A clustered tensor: a random mask (optionally dead rows/columns, rows of varied density) and
    skewed codebook indices over codebook 1..K."""
    rng = np.random.default_rng(seed)
    rows, cols = sparse.grid(shape)
    row_density = np.clip(density * np.exp(row_spread * rng.standard_normal(rows)), 0, 1)
    mask = rng.random((rows, cols)) < row_density[:, None]
    mask[rng.random(rows) < dead_rows] = False
    mask[:, rng.random(cols) < dead_cols] = False
    positions = np.flatnonzero(mask)
    ids = np.minimum(rng.geometric(0.3, positions.size) - 1, k - 1).astype(np.uint16)
    return SparseCode(np.arange(1, k + 1, dtype=np.float32), positions.astype(np.int64), ids, rows * cols)


def round_trip(codec, code: SparseCode, shape: tuple[int, ...]) -> tuple[dict[str, int], dict[str, bytes]]:
    params, sections = codec.encode(code, shape)
    decoded = codec.decode(params, sections, shape, code.k)
    assert decoded.shape == (code.size,)
    np.testing.assert_array_equal(decoded, code.dense_ids())
    return params, sections


def encoded_bits(sections: dict[str, bytes]) -> int:
    return 8 * sum(len(data) for data in sections.values())


def pruned_lenet_fc1(sparsity: float) -> tuple[np.ndarray, SparseCode]:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from weightless_cli.stages.prune import prune_array
    from weightless_cli.stages.quantize import quantize_array

    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(LENET)).graph.initializer}
    values = quantize_array(prune_array(weights["fc1.weight"], sparsity), 32)
    return values, sparse_code(values)


# --- round trips ---------------------------------------------------------------------------------------------

shapes = st.lists(st.integers(0, 24), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, k=st.integers(1, 40), density=st.floats(0, 1), seed=st.integers(0, 2**32 - 1),
       dead_rows=st.sampled_from([0.0, 0.3]), dead_cols=st.sampled_from([0.0, 0.5]),
       spread=st.sampled_from([0.0, 1.5]), codec=st.sampled_from(sorted(CODECS)))
def test_round_trip_is_exact(shape, k, density, seed, dead_rows, dead_cols, spread, codec):
    round_trip(CODECS[codec], make_code(shape, k, density, seed, dead_rows, dead_cols, spread), shape)


@pytest.mark.parametrize(
    ("shape", "density", "dead_rows", "dead_cols", "spread"),
    [((40, 60), 0.1, 0.3, 0.4, 1.5), ((8, 3, 5, 5), 0.3, 0.2, 0.2, 0.0), ((30, 1), 0.5, 0.0, 0.0, 0.0),
     ((500,), 0.05, 0.0, 0.0, 0.0), ((60, 50), 0.9, 0.0, 0.0, 1.0)],
)
def test_every_sparse_layout_round_trips(shape, density, dead_rows, dead_cols, spread):
    """Each candidate (flat/rows/cols, dropped dead rows/columns, each class resolution) decodes exactly,
    whichever one the encoder would pick."""
    code = make_code(shape, 12, density, 7, dead_rows, dead_cols, spread)
    candidates = sparse._candidates(code, shape)
    assert {plan.lines.mode for plan in candidates} == {sparse.MODE_FLAT, sparse.MODE_ROWS, sparse.MODE_COLS}
    for plan in candidates:
        params, sections = sparse._encode_plan(code, shape, plan)
        np.testing.assert_array_equal(sparse.decode(params, sections, shape, code.k), code.dense_ids())


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize(
    ("shape", "positions", "ids", "k"),
    [
        ((0,), [], [], 0),  # an empty tensor
        ((3, 0, 2), [], [], 2),
        ((4, 5), [], [], 1),  # all zero
        ((1,), [0], [0], 1),  # a scalar-sized tensor
        ((), [0], [0], 1),  # a scalar
        ((7, 3), list(range(21)), [2] * 21, 3),  # all nonzero, one index
        ((1, 100000), [99999], [0], 1),  # one nonzero after a long run (several csr fillers)
        ((5, 5), [0, 24], [65534, 0], 65535),  # the largest codebook
    ],
)
def test_edge_cases_round_trip(codec, shape, positions, ids, k):
    code = SparseCode(np.arange(1, k + 1, dtype=np.float32), np.array(positions, dtype=np.int64),
                      np.array(ids, dtype=np.uint16), math.prod(shape))
    round_trip(CODECS[codec], code, shape)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_round_trip_through_the_container_restores_the_tensor(codec):
    rng = np.random.default_rng(3)
    values = np.where(rng.random((30, 40)) < 0.2, rng.choice([-0.5, 0.25, 0.75], (30, 40)), 0).astype(np.float16)
    code = sparse_code(values)
    params, sections = CODECS[codec].encode(code, values.shape)
    record = TensorRecord("w", values.shape, "float16", codec, params,
                          {**sections, "codebook": array_to_bytes(code.codebook, "float16")})
    back = read_blob(write_blob(Blob(b"graph", [record]))).tensors[0]
    codebook = bytes_to_array(back.sections["codebook"], back.dtype)
    ids = CODECS[codec].decode(back.params, back.sections, back.shape, codebook.size)
    np.testing.assert_array_equal(values_from_ids(codebook, ids).reshape(values.shape), values)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_encoding_is_deterministic(codec):
    code = make_code((50, 70), 16, 0.08, 11, 0.1, 0.2, 1.0)
    first = CODECS[codec].encode(code, (50, 70))
    again = CODECS[codec].encode(make_code((50, 70), 16, 0.08, 11, 0.1, 0.2, 1.0), (50, 70))
    assert first == again
    assert CODECS[codec].estimate_bits(code, (50, 70)) == encoded_bits(first[1])


# --- sizes ---------------------------------------------------------------------------------------------------


def test_order0_bound_matches_its_definition():
    code = SparseCode(np.arange(1, 4, dtype=np.float32), np.array([1, 5, 6, 9]), np.array([0, 0, 1, 2]), 12)
    expected = math.log2(math.comb(12, 4)) + (2 * 1 + 1 * 2 + 1 * 2)  # H of (2, 1, 1) = 1.5 bits each
    assert sparse.order0_bound_bits(code) == pytest.approx(expected)


@pytest.mark.parametrize(("shape", "density", "k"),
                         [((300, 784), 0.03, 16), ((1000, 1000), 0.04, 32), ((100, 300), 0.1, 16),
                          ((64, 32, 3, 3), 0.3, 8), ((20000,), 0.04, 4)])
def test_sparse_is_within_3_percent_of_the_bound_on_random_masks(shape, density, k):
    rng = np.random.default_rng(5)
    n_positions = math.prod(shape)
    positions = np.flatnonzero(rng.random(n_positions) < density)
    code = SparseCode(np.arange(1, k + 1, dtype=np.float32), positions,
                      rng.integers(0, k, positions.size).astype(np.uint16), n_positions)
    _, sections = round_trip(sparse, code, shape)
    bound = sparse.order0_bound_bits(code)
    assert bound <= encoded_bits(sections) <= 1.03 * bound


def test_dense_is_within_3_percent_of_the_bound_when_barely_pruned():
    code = make_code((200, 300), 16, 0.9, 2)
    _, sections = round_trip(dense, code, (200, 300))
    assert encoded_bits(sections) <= 1.03 * sparse.order0_bound_bits(code)


def test_sparse_exploits_dead_columns_and_row_density():
    """Dead inputs (zero columns of a Gemm weight) and rows of very different density: the encoder drops
    the columns and models the rows, and lands well below the order-0 bound."""
    code = make_code((256, 512), 16, 0.05, 9, dead_cols=0.5, row_spread=1.5)
    params, sections = round_trip(sparse, code, (256, 512))
    assert params["dead_cols"] > 200
    assert encoded_bits(sections) < 0.9 * sparse.order0_bound_bits(code)


def test_sparse_beats_the_bound_and_deep_compression_on_a_real_pruned_layer():
    values, code = pruned_lenet_fc1(0.97)
    _, sparse_sections = round_trip(sparse, code, values.shape)
    _, csr_sections = round_trip(csr_huffman, code, values.shape)
    bound = sparse.order0_bound_bits(code)
    assert encoded_bits(sparse_sections) < 0.9 * bound
    assert encoded_bits(sparse_sections) < encoded_bits(csr_sections)


# --- csr-huffman ---------------------------------------------------------------------------------------------


def test_filler_zeros_follow_deep_compression_figure_2():
    """3-bit relative indices: a gap of 10 zeros needs one filler (skips 7 zeros and is itself a zero)."""
    code = SparseCode(np.array([1.0, 2.0], dtype=np.float32), np.array([1, 4, 15]), np.array([0, 1, 1]), 20)
    relative, ids = csr_huffman.relative_entries(code, 3)
    assert relative.tolist() == [1, 2, 7, 2] and ids.tolist() == [0, 1, 2, 1]
    params, sections = csr_huffman.encode(code, (20,), bits=3)
    assert params == {"bits": 3, "entries": 4}
    np.testing.assert_array_equal(csr_huffman.decode(params, sections, (20,), 2), code.dense_ids())


def test_csr_huffman_keeps_the_smallest_index_width():
    values, code = pruned_lenet_fc1(0.92)
    params, sections = csr_huffman.encode(code, values.shape)
    sizes = {bits: encoded_bits(csr_huffman.encode(code, values.shape, bits=bits)[1]) for bits in csr_huffman.WIDTHS}
    assert encoded_bits(sections) == min(sizes.values()) and params["bits"] == min(sizes, key=sizes.get)


def test_canonical_huffman_codes_are_complete_prefix_codes_within_16_bits():
    fibonacci = [1, 1]
    while len(fibonacci) < 30:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])  # the counts that make the deepest Huffman tree
    assert csr_huffman.code_lengths(np.array(fibonacci), max_length=64).max() == 29
    lengths = csr_huffman.code_lengths(np.array(fibonacci))
    assert lengths.max() <= csr_huffman.MAX_CODE_LENGTH
    assert sum(2.0 ** -length for length in lengths) == 1.0
    codes = csr_huffman.canonical_codes(lengths)
    words = {format(int(code), f"0{length}b") for code, length in zip(codes, lengths, strict=True)}
    assert len(words) == len(lengths)
    assert not any(a != b and b.startswith(a) for a in words for b in words)
    symbols = np.random.default_rng(0).integers(0, 30, 5000)
    data = csr_huffman._pack_codes(symbols, lengths)
    np.testing.assert_array_equal(csr_huffman._decode_stream(data, lengths, symbols.size, "test"), symbols)


def test_huffman_lengths_of_unskewed_counts_match_the_entropy():
    counts = np.array([8, 4, 2, 1, 1])
    assert csr_huffman.code_lengths(counts).tolist() == [1, 2, 3, 4, 4]
    assert csr_huffman.code_lengths(np.array([0, 5, 0])).tolist() == [0, 1, 0]


# --- shared pieces -------------------------------------------------------------------------------------------


@given(st.lists(st.integers(0, 2**32 - 1), max_size=50))
def test_bucketed_integers_round_trip(values):
    values = np.array(values, dtype=np.int64)
    symbols, widths, low = entropy.bucket_split(values)
    assert symbols.max(initial=0) < entropy.MAX_BUCKET_SYMBOLS
    np.testing.assert_array_equal(entropy.bucket_widths(symbols), widths)
    np.testing.assert_array_equal(entropy.bucket_join(symbols, low), values)


def test_frequency_tables_keep_counts_within_3_percent_and_used_symbols_nonzero():
    counts = np.array([0, 1, 7, 31, 32, 1000, 123456, 4000000, 0, 3])
    table = entropy.make_tables(np.array([counts], dtype=np.float64))[0]
    reader = entropy.ByteReader(table.data, "test")
    freqs = reader.table(counts.size, "table")
    reader.done()
    np.testing.assert_array_equal(freqs, table.freqs)
    assert ((freqs > 0) == (counts > 0)).all()
    ratio = (freqs / counts.clip(1))[counts > 0]
    assert np.ptp(np.log2(ratio[counts[counts > 0] > 31])) < 2 * math.log2(1 + 1 / 31) + 1e-9


def test_ans_stream_of_mixed_batches_round_trips():
    rng = np.random.default_rng(1)
    symbols = rng.integers(0, 5, 3000)
    table = entropy.make_table(np.bincount(symbols))
    raw = rng.integers(0, 2**31, 200)
    widths = np.full(200, 31)
    writer = entropy.AnsWriter()
    writer.symbols(symbols, table.freqs)
    writer.raw(raw, widths)
    writer.binary(np.array([0, 1, 1, 0]))
    reader = entropy.AnsReader(writer.finish(), "test stream")
    np.testing.assert_array_equal(reader.symbols(3000, table.freqs, "x"), symbols)
    np.testing.assert_array_equal(reader.raw(widths), raw)
    np.testing.assert_array_equal(reader.binary(4, 2), [0, 1, 1, 0])
    reader.finish()


# --- corrupt and forged input --------------------------------------------------------------------------------


def assert_rejected_or_valid(codec, params, sections, shape, k):
    """A damaged payload may still decode to *some* tensor; it must never do anything but that or raise
    a one-line BadInputError."""
    try:
        out = codec.decode(params, sections, shape, k)
    except BadInputError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert out.shape == (math.prod(shape),) and int(out.max(initial=0)) <= k


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_every_single_bit_flip_of_every_section_is_handled(codec):
    shape = (20, 30)
    code = make_code(shape, 6, 0.15, 4, 0.1, 0.2, 1.0)
    params, sections = CODECS[codec].encode(code, shape)
    for name, data in sections.items():
        for index in range(len(data)):
            for bit in range(8):
                damaged = bytearray(data)
                damaged[index] ^= 1 << bit
                assert_rejected_or_valid(CODECS[codec], params, {**sections, name: bytes(damaged)}, shape, code.k)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_truncated_and_extended_sections_are_handled(codec):
    shape = (20, 30)
    code = make_code(shape, 6, 0.15, 4)
    params, sections = CODECS[codec].encode(code, shape)
    for name, data in sections.items():
        for variant in (data[:-1], data[:-4], b"", data + b"\0", data + b"\1\2\3\4"):
            assert_rejected_or_valid(CODECS[codec], params, {**sections, name: variant}, shape, code.k)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), codec=st.sampled_from(sorted(CODECS)))
def test_forged_params_and_payloads_only_ever_raise_bad_input(data, codec):
    shape = data.draw(st.sampled_from([(20, 30), (0, 2**32), (2**20,), (7,)]))
    k = data.draw(st.integers(0, 300))
    names = {"sparse": sparse.PARAM_NAMES, "csr-huffman": csr_huffman.PARAM_NAMES, "dense": ()}[codec]
    value = st.one_of(st.integers(-3, 300), st.sampled_from([2**31, 2**32, 2**63 - 1, -(2**63)]))
    params = {name: data.draw(value) for name in names}
    sections = {name: data.draw(st.binary(max_size=64)) for name in CODECS[codec].SECTIONS if name != "codebook"}
    assert_rejected_or_valid(CODECS[codec], params, sections, shape, k)


@pytest.mark.parametrize(
    ("codec", "change", "message"),
    [
        (sparse, {"n": 10**6}, "param n = 1000000 outside 0..600"),
        (sparse, {"mode": 3}, "param mode = 3"),
        (sparse, {"classes": 0}, "at least one gap model"),
        (sparse, {"dead_cols": 31}, "param dead_cols = 31 outside 0..30"),
        (csr_huffman, {"bits": 9}, "param bits = 9"),
        (csr_huffman, {"entries": 601}, "param entries = 601"),
        (csr_huffman, {"entries": 1}, "the gaps stream is"),
        (dense, {"n": 1}, "unexpected params"),
    ],
)
def test_bad_params_are_refused_before_decoding(codec, change, message):
    shape = (20, 30)
    code = make_code(shape, 6, 0.15, 4)
    params, sections = codec.encode(code, shape)
    with pytest.raises(BadInputError, match="corrupt") as caught:
        codec.decode({**params, **change}, sections, shape, code.k)
    assert message in str(caught.value)


def test_an_empty_tensor_cannot_ask_for_huge_bitmaps():
    """A (0, 2^32) tensor has 2^32 columns: a forged 'dead columns' count must not make the decoder read
    a bitmap of that size."""
    params = dict.fromkeys(sparse.PARAM_NAMES, 0) | {"classes": 1, "dead_cols": 2**32 - 1}
    with pytest.raises(BadInputError, match="empty tensor"):
        sparse.decode(params, {"model": b"\0\0", "stream": b""}, (0, 2**32), 1)


# --- the spec (docs/codecs/exact.md) -------------------------------------------------------------------------

SPEC_MD = Path(__file__).resolve().parents[1] / "docs" / "codecs" / "exact.md"
PRECISION = 24


def spec_quantized(freqs: list[float]) -> list[tuple[int, int]]:
    """(left cumulative, probability) of each symbol at 24 bits, as exact.md defines it."""
    scale = float((1 << PRECISION) - len(freqs)) / sum(freqs)
    lefts, cumulative = [], 0.0
    for index, freq in enumerate(freqs):
        lefts.append(int(cumulative * scale) + index)
        cumulative += freq
    lefts.append(1 << PRECISION)
    return [(lefts[i], lefts[i + 1] - lefts[i]) for i in range(len(freqs))]


def spec_ans_encode(items: list[tuple[int, int]]) -> bytes:
    """exact.md's ANS encoder, one symbol at a time: ``items`` are (left, probability) in decode order."""
    state, words = 0, []
    for left, probability in reversed(items):
        if state >> (64 - PRECISION) >= probability:
            words.append(state & 0xFFFFFFFF)
            state >>= 32
        state = (state // probability) << PRECISION | (left + state % probability)
    while state:
        words.append(state & 0xFFFFFFFF)
        state >>= 32
    return b"".join(word.to_bytes(4, "little") for word in words)


def spec_raw_items(values: list[int], widths: list[int]) -> list[tuple[int, int]]:
    items = []
    for shift in range(0, max(widths, default=0), 16):
        for value, width in zip(values, widths, strict=True):
            if width > shift:
                bits = min(width - shift, 16)
                items.append((((value >> shift) & ((1 << bits) - 1)) << (PRECISION - bits), 1 << (PRECISION - bits)))
    return items


@settings(max_examples=40, deadline=None)
@given(freqs=st.lists(st.integers(0, 507904), min_size=2, max_size=40).filter(lambda f: sum(1 for x in f if x) > 1),
       seed=st.integers(0, 2**32 - 1), raw=st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)),
                                                    max_size=20))
def test_ans_stream_is_what_the_spec_says(freqs, seed, raw):
    """An independent, one-symbol-at-a-time encoder written from exact.md gives constriction's bytes."""
    rng = np.random.default_rng(seed)
    used = [i for i, f in enumerate(freqs) if f]
    symbols = rng.choice(used, size=int(rng.integers(1, 200)))
    values = [value & ((1 << width) - 1) for value, width in raw]
    widths = [width for _, width in raw]
    writer = entropy.AnsWriter()
    writer.symbols(symbols, np.array(freqs, dtype=np.float64))
    writer.raw(np.array(values, dtype=np.int64), np.array(widths, dtype=np.int64))
    model = spec_quantized([float(f) for f in freqs])
    items = [model[s] for s in symbols] + spec_raw_items(values, widths)
    assert writer.finish() == spec_ans_encode(items)


def spec_example() -> str:
    """The worked example of exact.md: a 4 x 6 tensor, three codebook values, every codec's output."""
    values = np.zeros((4, 6), dtype=np.float32)
    values[0, [1, 2, 5]] = [0.25, -0.5, 0.25]
    values[2, [0, 1, 2, 4]] = [0.75, 0.25, 0.25, -0.5]
    values[3, 5] = 0.25
    code = sparse_code(values)
    lines = []
    for name, codec in CODECS.items():
        params, sections = codec.encode(code, values.shape)
        lines.append(f"{name}: params {', '.join(f'{key}={value}' for key, value in sorted(params.items()))}")
        lines += [f"  {section:<8} {data.hex(' ') or '(empty)'}" for section, data in sorted(sections.items())]
    return "\n".join(lines) + "\n"


def test_exact_md_worked_example_matches_the_code():
    text = SPEC_MD.read_text(encoding="utf-8")
    match = re.search(r"<!-- exact-example:begin -->\n```text\n(.*?)```\n<!-- exact-example:end -->", text, re.S)
    assert match, "docs/codecs/exact.md lost its worked example markers"
    assert match.group(1) == spec_example()
