"""Same inputs and seed ⇒ byte-identical outputs: run after run, in this process or a fresh one, with one
thread or two (OMP_NUM_THREADS for numpy's BLAS, CPU affinity for the Bloomier decode's helper processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import onnx_factory as factory
from tests.cli_helpers import run_cli

# prune → quantize → encode (two codecs) → decode, by file name inside one folder.
PIPELINE = [
    ["prune", "{src}", "-o", "p.onnx", "--sparsity", "0.8", "--sparsity", "fc2.weight=0.6"],
    ["quantize", "p.onnx", "-o", "q.onnx", "--clusters", "16"],
    ["encode", "q.onnx", "-o", "b.wl", "--fp-bits", "5", "--seed", "3"],
    ["encode", "q.onnx", "-o", "s.wl", "--codec", "sparse"],
    ["decode", "b.wl", "-o", "d.onnx"],
    ["decode", "s.wl", "-o", "e.onnx"],
]

# Runs the pipeline in a fresh interpreter, the way a shell (or `make -j`) would, one command at a time.
_RUNNER = """
import json, os, sys
from weightless_cli.cli import main
os.chdir(sys.argv[1])
for args in json.loads(sys.argv[2]):
    sys.argv = ["weightless", *args, "-q", "-f"]
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise
"""


def _commands(src: Path) -> list[list[str]]:
    return [[arg.format(src=src) for arg in command] for command in PIPELINE]


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _run_in_subprocess(folder: Path, src: Path, threads: int) -> dict[str, bytes]:
    folder.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    cpus = sorted(os.sched_getaffinity(0))[:threads]

    def pin() -> None:  # the Bloomier decode starts helper processes for the CPUs it may use
        os.sched_setaffinity(0, cpus)

    subprocess.run([sys.executable, "-c", _RUNNER, str(folder), json.dumps(_commands(src))], env=env,
                   preexec_fn=pin, check=True, timeout=300)
    return _outputs(folder)


def _run_in_process(capsys, folder: Path, src: Path) -> dict[str, bytes]:
    folder.mkdir()
    for command in _commands(src):
        resolved = [str(folder / arg) if arg.endswith((".onnx", ".wl")) and "/" not in arg else arg
                    for arg in command]
        result = run_cli(capsys, *resolved, "-q")
        assert result.code == 0, (command, result.err)
    return _outputs(folder)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_pipeline_outputs_are_byte_identical_across_runs_and_threads(capsys, tmp_path, external):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to compare one thread with two")
    src = factory.save(factory.mlp(sizes=(256, 192, 10), seed=11), tmp_path / "src.onnx", external=external)
    first = _run_in_process(capsys, tmp_path / "in-process-1", src)
    runs = {
        "in-process again": _run_in_process(capsys, tmp_path / "in-process-2", src),
        "subprocess, 1 thread": _run_in_subprocess(tmp_path / "one-thread", src, 1),
        "subprocess, 2 threads": _run_in_subprocess(tmp_path / "two-threads", src, 2),
    }
    expected_files = {"p.onnx", "q.onnx", "b.wl", "s.wl", "d.onnx", "e.onnx"}
    if external:
        expected_files |= {"p.onnx.data", "q.onnx.data"}
    assert set(first) == expected_files
    for name, outputs in runs.items():
        differing = sorted(f for f in first if outputs.get(f) != first[f])
        assert not differing, f"{name}: {differing} differ from the first run"


# Decodes b.wl to d.onnx with helpers already started (a cold one may join too late for a
# short decode), then says how many blocks they filled.
_DECODE_RUNNER = """
import os, sys
from weightless_cli.cli import main
from weightless_cli.codecs import parallel
from tests.conftest import warm
os.chdir(sys.argv[1])
warm(parallel._POOL, parallel.default_workers() - 1)
blocks = []
receive = parallel._Helper.receive_block
parallel._Helper.receive_block = lambda helper, out: blocks.append(1) or receive(helper, out)
sys.argv = ["weightless", "decode", "b.wl", "-o", "d.onnx", "-q", "-f"]
try:
    main()
except SystemExit as exc:
    if exc.code:
        raise
print(len(blocks))
"""


def test_a_decode_shared_with_helper_processes_gives_the_same_bytes_on_one_cpu(capsys, tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to compare one core with two")
    from weightless_cli.codecs import parallel

    src = factory.save(factory.mlp(sizes=(4096, 1024, 10), seed=4), tmp_path / "src.onnx")
    assert parallel.MIN_SHARED <= 4096 * 1024  # fc1 is long enough to share
    for command in (
        ["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--sparsity", "0.96"],
        ["quantize", str(tmp_path / "p.onnx"), "-o", str(tmp_path / "q.onnx"), "--clusters", "16"],
        ["encode", str(tmp_path / "q.onnx"), "-o", str(tmp_path / "b.wl"), "--fp-bits", "4"],
    ):
        assert run_cli(capsys, *command, "-q").code == 0
    decoded = {}
    for cpus in (1, 2):
        folder = tmp_path / f"cpus-{cpus}"
        folder.mkdir()
        (folder / "b.wl").write_bytes((tmp_path / "b.wl").read_bytes())
        allowed = sorted(os.sched_getaffinity(0))[:cpus]
        child = subprocess.run([sys.executable, "-c", _DECODE_RUNNER, str(folder)], capture_output=True, text=True,
                               preexec_fn=lambda allowed=allowed: os.sched_setaffinity(0, allowed), check=True,
                               timeout=300, cwd=Path(__file__).resolve().parent.parent)
        helper_blocks = int(child.stdout.split()[-1])
        assert (helper_blocks > 0) == (cpus == 2)  # on two CPUs a helper process did part of fc1
        decoded[cpus] = (folder / "d.onnx").read_bytes()
    assert decoded[1] == decoded[2]
