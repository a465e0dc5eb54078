"""Bad input everywhere, through the CLI: one line on stderr that names the file, and the documented exit code
(3 bad input, 2 usage). The stage tests cover the happy paths; here is what users really feed the tool."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests import onnx_factory as factory
from tests.cli_helpers import run_cli


@pytest.fixture
def files(capsys, tmp_path) -> dict[str, Path]:
    """One of every kind of input, good and bad, in tmp_path."""
    mlp = factory.save(factory.mlp(sizes=(64, 48, 10)), tmp_path / "mlp.onnx")
    quantized, blob = tmp_path / "mlp.q.onnx", tmp_path / "mlp.wl"
    assert run_cli(capsys, "quantize", mlp, "-o", quantized, "--clusters", "4").code == 0
    assert run_cli(capsys, "encode", quantized, "-o", blob, "-q").code == 0
    paths = {"mlp": mlp, "quantized": quantized, "blob": blob, "out": tmp_path / "out.onnx",
             "outwl": tmp_path / "out.wl", "missing": tmp_path / "missing.onnx", "dir": tmp_path / "a-folder",
             "nofolder": tmp_path / "no-such-folder" / "out.onnx"}
    paths["dir"].mkdir()
    (tmp_path / "notonnx.onnx").write_bytes(b"PK\x03\x04 a zip file, not a model")
    paths["notonnx"] = tmp_path / "notonnx.onnx"
    data = mlp.read_bytes()
    paths["truncated"] = tmp_path / "truncated.onnx"
    paths["truncated"].write_bytes(data[: len(data) * 2 // 3])
    broken = factory.mlp(sizes=(64, 48, 10))
    broken.graph.node[0].input[0] = "nobody_makes_this"  # the checker refuses an input nothing produces
    paths["unchecked"] = tmp_path / "unchecked.onnx"
    onnx.save(broken, paths["unchecked"])
    paths["newer"] = tmp_path / "newer.wl"
    paths["newer"].write_bytes(_with_major_version(blob.read_bytes(), 3))  # the writer writes 2.0
    (tmp_path / "ext").mkdir()
    paths["external"] = factory.save(factory.mlp(sizes=(64, 48, 10)), tmp_path / "ext" / "ext.onnx", external=True)
    rng = np.random.default_rng(0)
    paths["good_npz"] = tmp_path / "good.npz"
    np.savez(paths["good_npz"], x=rng.normal(size=(20, 64)).astype(np.float32), y=rng.integers(0, 10, 20))
    paths["wrong_npz"] = tmp_path / "wrong.npz"
    np.savez(paths["wrong_npz"], x=rng.normal(size=(20, 7)).astype(np.float32), y=rng.integers(0, 10, 20))
    return paths


def _with_major_version(blob: bytes, major: int) -> bytes:
    """The blob with another format major version and every checksum made valid again (docs/FORMAT.md)."""
    head = bytearray(blob[:20])
    head[8:10] = struct.pack("<H", major)
    body = bytes(head) + struct.pack("<I", zlib.crc32(head)) + blob[24:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def assert_one_line(result, code: int, names: Path | str | None, message: str) -> None:
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err and result.err.count("\n") == 1, result.err
    assert result.err.startswith("weightless: error: ") and message in result.err, result.err
    if names is not None:
        assert str(names) in result.err, result.err


# (args, exit code, the path the message must name, words it must contain). {name} is a path from `files`.
CASES = {
    # not ONNX at all, wherever a model is read
    "inspect-not-onnx": (["inspect", "{notonnx}"], 3, "notonnx", "not an ONNX model"),
    "prune-not-onnx": (["prune", "{notonnx}", "-o", "{out}", "--sparsity", "0.5"], 3, "notonnx", "not an ONNX model"),
    "encode-not-onnx": (["encode", "{notonnx}", "-o", "{outwl}"], 3, "notonnx", "not an ONNX model"),
    "eval-not-onnx": (["eval", "{notonnx}", "--data", "{good_npz}"], 3, "notonnx", "not an ONNX model"),
    "verify-reference-not-onnx": (["verify", "{blob}", "--reference", "{notonnx}"], 3, "notonnx",
                                  "not an ONNX model"),
    "blob-is-onnx": (["verify", "{mlp}"], 3, "mlp", "not a .wl blob"),
    "decode-onnx-as-blob": (["decode", "{mlp}", "-o", "{out}"], 3, "mlp", "not a .wl blob"),
    # truncated ONNX
    "inspect-truncated": (["inspect", "{truncated}"], 3, "truncated", "truncated or another format"),
    "quantize-truncated": (["quantize", "{truncated}", "-o", "{out}", "--clusters", "4"], 3, "truncated",
                           "not an ONNX model"),
    "eval-truncated": (["eval", "{truncated}", "--data", "{good_npz}"], 3, "truncated", "not an ONNX model"),
    # parses, but the ONNX checker refuses it
    "prune-fails-checker": (["prune", "{unchecked}", "-o", "{out}", "--sparsity", "0.5"], 3, "unchecked",
                            "fails the ONNX checker"),
    "encode-fails-checker": (["encode", "{unchecked}", "-o", "{outwl}"], 3, "unchecked", "fails the ONNX checker"),
    "eval-fails-checker": (["eval", "{unchecked}", "--data", "{good_npz}"], 3, "unchecked", "nobody_makes_this"),
    # a blob from a newer format version
    "verify-newer-blob": (["verify", "{newer}"], 3, "newer", "is newer than what this weightless reads"),
    "decode-newer-blob": (["decode", "{newer}", "-o", "{out}"], 3, "newer", "upgrade weightless"),
    "decode-and-eval-newer-blob": (["decode-and-eval", "{newer}", "--data", "{good_npz}"], 3, "newer",
                                   "upgrade weightless"),
    # data that does not fit the model
    "eval-wrong-shape": (["eval", "{mlp}", "--data", "{wrong_npz}"], 3, "wrong.npz", "expects [N, 64]"),
    "decode-and-eval-wrong-shape": (["decode-and-eval", "{blob}", "--data", "{wrong_npz}"], 3, "wrong.npz",
                                    "expects [N, 64]"),
    # nothing to work on, or settings that cannot work
    "prune-empty-selection": (["prune", "{mlp}", "-o", "{out}", "--sparsity", "0.5", "--layers", "conv*"], 2, "mlp",
                              "no weight tensor matches --layers conv*"),
    "encode-empty-selection": (["encode", "{quantized}", "-o", "{outwl}", "--layers", "nothing"], 2, "quantized",
                               "no weight tensor matches"),
    "sparsity-one": (["prune", "{mlp}", "-o", "{out}", "--sparsity", "1"], 2, None, "outside [0, 1)"),
    "sparsity-negative": (["prune", "{mlp}", "-o", "{out}", "--sparsity=-0.1"], 2, None, "outside [0, 1)"),
    "sparsity-nan": (["prune", "{mlp}", "-o", "{out}", "--sparsity", "nan"], 2, None, "outside [0, 1)"),
    "sparsity-per-tensor": (["prune", "{mlp}", "-o", "{out}", "--sparsity", "fc1.weight=1.5"], 2, None,
                            "outside [0, 1)"),
    "more-clusters-than-values": (["quantize", "{quantized}", "-o", "{out}", "--clusters", "9"], 2, "quantized",
                                  "only 4 distinct nonzero values"),
    # a folder where a file should be
    "inspect-folder": (["inspect", "{dir}"], 3, "dir", "is a directory"),
    "prune-folder": (["prune", "{dir}", "-o", "{out}", "--sparsity", "0.5"], 3, "dir", "is a directory"),
    "verify-folder": (["verify", "{dir}"], 3, "dir", "is a directory"),
    "decode-folder": (["decode", "{dir}", "-o", "{out}"], 3, "dir", "is a directory"),
    "reference-folder": (["verify", "{blob}", "--reference", "{dir}"], 3, "dir", "is a directory"),
    "eval-data-folder": (["eval", "{mlp}", "--data", "{dir}"], 3, "dir", "test_data_set"),
    # outputs that cannot be written
    "prune-no-output-folder": (["prune", "{mlp}", "-o", "{nofolder}", "--sparsity", "0.5"], 3, "nofolder",
                               "output folder does not exist"),
    "encode-no-output-folder": (["encode", "{quantized}", "-o", "{nofolder}"], 3, "nofolder",
                                "output folder does not exist"),
    "decode-no-output-folder": (["decode", "{blob}", "-o", "{nofolder}"], 3, "nofolder",
                                "output folder does not exist"),
    # missing files
    "missing-model": (["quantize", "{missing}", "-o", "{out}", "--clusters", "4"], 3, "missing", "no such file"),
    "missing-blob": (["decode-and-eval", "{missing}", "--data", "{good_npz}"], 3, "missing", "no such file"),
}


def _fill(args: list[str], files: dict[str, Path]) -> list[str]:
    return [arg.format(**files) if "{" in arg else arg for arg in args]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_with_its_exit_code(capsys, files, case):
    args, code, names, message = CASES[case]
    result = run_cli(capsys, *_fill(args, files))
    shown = files.get(names, names)
    if names == "nofolder":
        shown = files["nofolder"].parent  # the folder that is missing is what the message names
    assert_one_line(result, code, shown, message)
    assert not files["out"].exists() and not files["outwl"].exists()


def test_output_that_is_a_folder_is_one_line(capsys, files):
    result = run_cli(capsys, "prune", files["mlp"], "-o", files["dir"], "--sparsity", "0.5")
    assert_one_line(result, 2, files["dir"], "is a directory")


def test_output_that_is_a_folder_is_refused_with_exit_2(capsys, files):
    """What happens today (and must keep happening): exit 2, the folder untouched."""
    result = run_cli(capsys, "prune", files["mlp"], "-o", files["dir"], "--sparsity", "0.5")
    assert result.code == 2 and "is a directory" in result.err and "Traceback" not in result.err
    assert files["dir"].is_dir() and not list(files["dir"].iterdir())


# --- external data ---------------------------------------------------------------------------------------------


def test_missing_external_data_file(capsys, files):
    data = files["external"].parent / "ext.onnx.data"
    data.unlink()
    for args in (["inspect", "{external}"], ["prune", "{external}", "-o", "{out}", "--sparsity", "0.5"],
                 ["encode", "{external}", "-o", "{outwl}"]):
        result = run_cli(capsys, *_fill(args, files))
        assert_one_line(result, 3, files["external"], "missing external-data file 'ext.onnx.data'")


def test_truncated_external_data_file(capsys, files):
    data = files["external"].parent / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:5000])
    result = run_cli(capsys, "quantize", files["external"], "-o", files["out"], "--clusters", "4")
    assert_one_line(result, 3, files["external"], "too short for tensor")


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd"])
def test_external_data_outside_the_models_folder_is_refused(capsys, files, location):
    model = onnx.load(str(files["external"]), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, files["external"])
    result = run_cli(capsys, "inspect", files["external"])
    assert_one_line(result, 3, files["external"], "outside the model's folder")


def test_external_data_that_is_a_folder(capsys, files):
    data = files["external"].parent / "ext.onnx.data"
    data.unlink()
    data.mkdir()
    result = run_cli(capsys, "inspect", files["external"])
    assert_one_line(result, 3, files["external"], "is not a regular file")


# --- unreadable files ------------------------------------------------------------------------------------------


def _run_without_read_override(args: list[str]) -> tuple[int, str]:
    """Run the CLI in a subprocess that cannot read mode-000 files: as root, drop the capabilities that let
    root read anything (setpriv); otherwise the normal permission checks already apply."""
    command = [sys.executable, "-m", "weightless_cli", *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: a mode-000 file stays readable")
        command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *command]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return completed.returncode, completed.stderr


@pytest.mark.parametrize("what, args, message", [
    ("mlp", ["inspect", "{mlp}"], "cannot read: Permission denied"),
    ("blob", ["verify", "{blob}"], "cannot read: Permission denied"),
    ("external-data", ["prune", "{external}", "-o", "{out}", "--sparsity", "0.5"],
     "cannot read external-data file 'ext.onnx.data': Permission denied"),
])
def test_unreadable_file(files, what, args, message):
    target = files["external"].parent / "ext.onnx.data" if what == "external-data" else files[what]
    target.chmod(0)
    try:
        code, err = _run_without_read_override(_fill(args, files))
    finally:
        target.chmod(0o644)
    named = files["external"] if what == "external-data" else files[what]
    assert code == 3, err
    assert err.count("\n") == 1 and "Traceback" not in err and message in err and str(named) in err, err
    assert not files["out"].exists()
