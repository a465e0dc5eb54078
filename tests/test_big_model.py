"""Models bigger than memory: external data read lazily, saved tensor by tensor, and (slow) a > 2 GiB model
through prune → quantize → encode → decode with each stage's peak memory measured."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests import onnx_factory as factory
from tests.cli_helpers import run_cli
from weightless_cli import fileio
from weightless_cli import model as model_module
from weightless_cli.model import OnnxModel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def external_mlp(tmp_path) -> Path:
    (tmp_path / "src").mkdir()
    return factory.save(factory.mlp(sizes=(512, 256, 10), seed=4), tmp_path / "src" / "mlp.onnx", external=True)


def _external_entries(model: OnnxModel) -> dict[str, list[tuple[str, str]]]:
    return {t.name: [(e.key, e.value) for e in t._proto.external_data] for t in model.weights}


def test_external_values_are_mapped_not_loaded(external_mlp):
    model = OnnxModel.load(external_mlp)
    assert model.used_external_data
    weight = model.weight("fc1.weight")
    values = weight.array()
    assert not values.flags.writeable and not values.flags.owndata  # a view of the mapped file
    assert weight._proto.data_location == onnx.TensorProto.EXTERNAL and not weight._proto.raw_data
    full = onnx.load(str(external_mlp))  # onnx's own loader reads everything
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in full.graph.initializer}
    for tensor in model.weights:
        np.testing.assert_array_equal(tensor.array(), expected[tensor.name])
    # Asking for the whole protobuf puts every value in it: the same model onnx.load gives.
    assert model.proto == full


def test_save_streams_untouched_tensors_and_leaves_the_model_as_it_was(external_mlp, tmp_path):
    model = OnnxModel.load(external_mlp)
    before = _external_entries(model)
    halved = model.weight("fc1.weight").array() * 0.5
    model.weight("fc1.weight").set_array(halved)
    out = tmp_path / "out.onnx"
    model.save(out)
    saved = onnx.load(str(out), load_external_data=False)
    for tensor in saved.graph.initializer:
        big = tensor.name != "fc2.bias"  # 40 bytes: under the external-data threshold, stays inline
        assert (tensor.data_location == onnx.TensorProto.EXTERNAL) == big, tensor.name
        if big:
            entries = dict((e.key, e.value) for e in tensor.external_data)
            assert entries["location"] == "out.onnx.data"
            assert int(entries["offset"]) % (4096 if int(entries["length"]) >= 1 << 20 else 64) == 0
    reloaded = OnnxModel.load(out)
    np.testing.assert_array_equal(reloaded.weight("fc1.weight").array(), halved)
    np.testing.assert_array_equal(reloaded.weight("fc2.weight").array(), model.weight("fc2.weight").array())
    # The in-memory model still reads its own source and its pending change, and saves the same bytes again.
    after = _external_entries(model)
    assert after["fc1.bias"] == before["fc1.bias"] and after["fc2.weight"] == before["fc2.weight"]
    assert after["fc1.weight"] == [] and model.weight("fc1.weight")._pending is not None
    (tmp_path / "again").mkdir()
    again = tmp_path / "again" / "out.onnx"
    model.save(again)
    assert again.read_bytes() == out.read_bytes()
    assert (tmp_path / "again" / "out.onnx.data").read_bytes() == (tmp_path / "out.onnx.data").read_bytes()
    x = np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32)
    assert ort.InferenceSession(str(out)).run(None, {"input": x})[0].shape == (3, 10)


def test_save_renames_the_data_file_before_the_model(external_mlp, tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace

    def recording_replace(source, target):
        renamed.append(Path(target).name)
        real_replace(source, target)

    monkeypatch.setattr(fileio.os, "replace", recording_replace)
    OnnxModel.load(external_mlp).save(tmp_path / "out.onnx")
    assert renamed == ["out.onnx.data", "out.onnx"]


def test_a_failed_save_keeps_the_old_output_and_the_model(external_mlp, tmp_path, monkeypatch):
    out = tmp_path / "out.onnx"
    model = OnnxModel.load(external_mlp)
    model.save(out)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    model.weight("fc2.weight").set_array(np.zeros(model.weight("fc2.weight").shape, np.float32))
    before = _external_entries(model)

    def disk_full(self, stream):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_module.ExternalSlice, "copy_into", disk_full)
    with pytest.raises(OSError, match="No space left"):
        model.save(out)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == old  # no temp files either
    assert _external_entries(model) == before
    assert not model.weight("fc2.weight").array().any()


def test_set_array_keeps_an_owned_array_and_copies_anything_else(external_mlp):
    weight = OnnxModel.load(external_mlp).weight("fc1.weight")
    owned = np.ones(weight.shape, np.float32)
    weight.set_array(owned)
    assert weight.array() is owned and not owned.flags.writeable  # taken over: no copy of a big tensor
    with pytest.raises(ValueError):
        owned[0, 0] = 2.0
    source = np.ones(weight.shape, np.float64)
    weight.set_array(source)
    assert weight.array() is not source and weight.array().dtype == np.float32 and source.flags.writeable
    view = np.ones((2, *weight.shape), np.float32)[0]
    weight.set_array(view)
    assert weight.array() is not view and view.flags.writeable


def test_a_decoded_model_too_big_for_protobuf_is_saved_with_external_data(capsys, tmp_path, monkeypatch):
    """decode writes external data when the model would not fit one protobuf (here: a lowered limit)."""
    src = factory.save(factory.mlp(sizes=(256, 128, 10)), tmp_path / "m.onnx")
    quantized, blob, decoded = tmp_path / "q.onnx", tmp_path / "m.wl", tmp_path / "d.onnx"
    assert run_cli(capsys, "quantize", src, "-o", quantized, "--clusters", "8").code == 0
    assert run_cli(capsys, "encode", quantized, "-o", blob, "-q").code == 0
    monkeypatch.setattr(model_module, "PROTOBUF_LIMIT", 64 * 1024)
    assert run_cli(capsys, "decode", blob, "-o", decoded).code == 0, capsys.readouterr().err
    assert (tmp_path / "d.onnx.data").stat().st_size > 128 * 1024
    onnx.checker.check_model(str(decoded))
    reference = OnnxModel.load(quantized)
    for tensor in OnnxModel.load(decoded).weights:
        want, got = reference.weight(tensor.name).array(), tensor.array()
        np.testing.assert_array_equal(got[want != 0], want[want != 0])


def test_decode_and_eval_runs_a_model_too_big_for_protobuf_from_a_temporary_file(capsys, tmp_path, monkeypatch):
    src = factory.save(factory.mlp(sizes=(256, 128, 10)), tmp_path / "m.onnx")
    quantized, blob, data = tmp_path / "q.onnx", tmp_path / "m.wl", tmp_path / "data.npz"
    assert run_cli(capsys, "quantize", src, "-o", quantized, "--clusters", "8").code == 0
    assert run_cli(capsys, "encode", quantized, "-o", blob, "-q").code == 0
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(64, 256)).astype(np.float32), y=rng.integers(0, 10, 64))
    args = ("decode-and-eval", blob, "--data", data, "--reference", quantized, "--json")
    in_memory = run_cli(capsys, *args)
    assert in_memory.code == 0, in_memory.err

    saved: list[tuple[Path, bool]] = []
    real_save = OnnxModel.save
    monkeypatch.setattr(OnnxModel, "save", lambda self, path, external_data=None: (
        saved.append((Path(path), external_data)), real_save(self, path, external_data))[1])
    monkeypatch.setattr(model_module, "PROTOBUF_LIMIT", 64 * 1024)
    from_file = run_cli(capsys, *args)
    assert from_file.code == 0, from_file.err
    assert [external for _, external in saved] == [True]
    assert not saved[0][0].parent.exists()  # the temporary folder is gone
    assert from_file.json() == in_memory.json()


# --- the > 2 GiB model (slow) -------------------------------------------------------------------------------


def _run_measured(args: list[str], log: Path) -> tuple[float, int]:
    """Run ``weightless ARGS`` as a child; return (seconds, its peak RSS in bytes). os.wait4 gives this one
    child's rusage: what RUSAGE_CHILDREN would report for a parent that ran only it."""
    start = time.perf_counter()
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "weightless_cli", *args, "-q"], stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, f"{' '.join(args)}: {log.read_text()}"
    return time.perf_counter() - start, usage.ru_maxrss * 1024


@pytest.mark.slow
def test_big_model_through_every_stage_in_bounded_memory(tmp_path):
    width = 8192
    folder = tmp_path / "big"
    folder.mkdir()
    try:
        src = folder / "big.onnx"
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_big_model.py"), str(src), "--gb", "2.2",
                        "--width", str(width)], check=True)
        data_bytes = (folder / "big.onnx.data").stat().st_size
        tensor_bytes = width * width * 4
        assert data_bytes > 2**31  # beyond what one protobuf can hold
        stages = {
            "prune": ["prune", str(src), "-o", str(folder / "p.onnx"), "--sparsity", "0.9"],
            "quantize": ["quantize", str(folder / "p.onnx"), "-o", str(folder / "q.onnx"), "--clusters", "16"],
            "encode": ["encode", str(folder / "q.onnx"), "-o", str(folder / "m.wl")],
            "decode": ["decode", str(folder / "m.wl"), "-o", str(folder / "d.onnx")],
        }
        # What each stage may hold, in units of the whole data (D) and of its largest tensor (T):
        # prune's stage code keeps every input (mapped) and every output of prune_tensors at once; quantize
        # and decode keep every changed tensor until the save, plus about eight tensors of k-means (resp.
        # two of decoding) scratch; encode keeps one tensor and the blob.
        bounds = {"prune": (2.0, 8), "quantize": (1.0, 10), "encode": (0.0, 4), "decode": (1.0, 4)}
        print(f"\nmodel: {data_bytes / 2**30:.2f} GiB of weights in {data_bytes // tensor_bytes} tensors of "
              f"{tensor_bytes / 2**20:.0f} MiB")
        for name, args in stages.items():
            seconds, peak = _run_measured(args, folder / f"{name}.log")
            per_d, per_t = bounds[name]
            bound = per_d * data_bytes + per_t * tensor_bytes + (256 << 20)  # + the interpreter and libraries
            print(f"{name:>9}: peak RSS {peak / 2**30:5.2f} GiB (bound {bound / 2**30:5.2f} GiB = {per_d:g} D + "
                  f"{per_t} T + 256 MiB), {seconds:5.0f} s")
            assert peak < bound, f"{name} peaked at {peak / 2**30:.2f} GiB"
        blob_bytes = (folder / "m.wl").stat().st_size
        print(f"     blob: {blob_bytes / 2**20:.1f} MiB ({data_bytes / blob_bytes:.0f}x smaller)")
        decoded, quantized = OnnxModel.load(folder / "d.onnx"), OnnxModel.load(folder / "q.onnx")
        assert decoded.used_external_data
        for tensor in decoded.weights:  # one tensor at a time, mapped
            want, got = quantized.weight(tensor.name).array(), tensor.array()
            stored = want != 0
            np.testing.assert_array_equal(got[stored], want[stored])
            if tensor.role == "weight":
                assert np.count_nonzero(stored) == round(0.1 * tensor.params)
        session = ort.InferenceSession(str(folder / "d.onnx"))
        logits = session.run(None, {"input": np.ones((1, width), np.float32)})[0]
        assert logits.shape == (1, width) and np.isfinite(logits).all()
        # decode-and-eval cannot hand onnxruntime one protobuf of this size: it goes through a temporary file.
        np.savez(folder / "x.npz", x=np.random.default_rng(0).normal(size=(4, width)).astype(np.float32))
        report = folder / "eval.json"
        with open(report, "w") as out:
            subprocess.run([sys.executable, "-m", "weightless_cli", "decode-and-eval", str(folder / "m.wl"),
                            "--data", str(folder / "x.npz"), "--reference", str(folder / "d.onnx"), "--json"],
                           stdout=out, check=True)
        evaluated = json.loads(report.read_text())
        assert evaluated["samples"] == 4 and evaluated["agreement"] == 1.0 and evaluated["max_abs_logit_diff"] == 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # ~9.5 GB of model files
