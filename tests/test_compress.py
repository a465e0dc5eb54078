"""compress (the Weightless loop) end to end on the real sample model, and its recipes."""

import pytest

from tests.cli_helpers import run_cli
from weightless_cli.stages.compress import gradual_sparsities

pytest.importorskip("torch")

SMOKE_RECIPE = """
description = "a few seconds: two layers, small data"
train_limit = 3000
prune_steps = 2
seed = 3

[[layer]]
name = "fc1.weight"
sparsity = 0.9
clusters = 8
fp_bits = 7

[[layer]]
name = "fc2.weight"
sparsity = 0.8
clusters = 8
t = 9
"""


def test_compress_short_run_end_to_end(capsys, tmp_path, mnist_cache):
    recipe = tmp_path / "r.toml"
    recipe.write_text(SMOKE_RECIPE)
    blob = tmp_path / "m.wl"
    result = run_cli(capsys, "compress", "sample_models/lenet-300-100.onnx", "--data", "mnist", "--recipe", recipe,
                     "--eval-limit", "1000", "-o", blob, "--json")
    assert result.code == 0, result.err
    report = result.json()
    steps = [(row["layer"], row["step"]) for row in report["steps"]]
    assert steps[0] == (None, "original") and len(steps) == 1 + 2 * 5
    encoded = {row["name"]: row for row in report["tensors"] if row["codec"] == "bloomier"}
    assert encoded["fc1.weight"]["t"] == 4 + 7 and encoded["fc2.weight"]["t"] == 9
    pruned = [row for row in report["steps"] if row["step"].startswith("pruned")]
    assert abs(pruned[0]["sparsity"] - 0.9) < 1e-3 and abs(pruned[1]["sparsity"] - 0.8) < 1e-3
    assert report["file"]["ratio"] > 8
    # Retraining around the errors keeps the model useful on this small budget.
    assert report["accuracy_after"] > 0.9
    # The reported accuracy is the blob's own, as decode-and-eval measures it.
    again = run_cli(capsys, "decode-and-eval", blob, "--data", "mnist", "--limit", "1000", "--json").json()
    assert again["accuracy"] == report["accuracy_after"]


@pytest.mark.parametrize("text, code, message", [
    ("[[layer]]\nname='fc1.weight'\nsparsity=0.9\nclusters=8\nbogus=1\n", 3, "unknown key(s): bogus"),
    ("[[layer]]\nname='nope'\nsparsity=0.9\nclusters=8\n", 2, "not in the model: nope"),
    ("[[layer]]\nname='fc1.weight'\nsparsity=1.2\nclusters=8\n", 2, "outside [0, 1)"),
    ("epochs = [", 3, "not a valid TOML recipe"),
    ("lr = 0.1\n", 3, "at least one [[layer]]"),
])
def test_bad_recipes_are_one_line_errors(capsys, tmp_path, text, code, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    result = run_cli(capsys, "compress", "sample_models/lenet-300-100.onnx", "--data", "mnist", "--recipe", recipe,
                     "-o", tmp_path / "x.wl")
    assert result.code == code and message in result.err and result.err.count("\n") == 1
    assert not (tmp_path / "x.wl").exists()


def test_gradual_schedule_ends_at_target_and_front_loads():
    steps = gradual_sparsities(0.9, 3)
    assert steps[-1] == pytest.approx(0.9) and steps[0] > 0.9 / 3 and steps == sorted(steps)


def test_retrain_command_keeps_frozen_and_zeros(capsys, tmp_path, mnist_cache):
    import numpy as np

    from weightless_cli.model import OnnxModel

    pruned, out = tmp_path / "p.onnx", tmp_path / "r.onnx"
    assert run_cli(capsys, "prune", "sample_models/lenet-300-100.onnx", "-o", pruned, "--sparsity", "0.9").code == 0
    result = run_cli(capsys, "retrain", pruned, "--data", "mnist:train", "--limit", "2000", "--freeze", "fc1.*",
                     "-o", out, "--json")
    assert result.code == 0, result.err
    assert result.json()["frozen"] == ["fc1.weight", "fc1.bias"]
    before, after = OnnxModel.load(pruned), OnnxModel.load(out)
    assert after.weight("fc1.weight").proto == before.weight("fc1.weight").proto
    w2_before, w2_after = before.weight("fc2.weight").array(), after.weight("fc2.weight").array()
    assert np.array_equal(w2_before == 0, w2_after == 0) and not np.array_equal(w2_before, w2_after)


def test_retrain_command_trains_the_weights_of_the_if_branch_taken(capsys, tmp_path):
    import numpy as np

    from tests import onnx_factory as factory
    from weightless_cli.model import OnnxModel

    src, out = factory.save(factory.if_model(), tmp_path / "if.onnx"), tmp_path / "r.onnx"
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(128, 32)).astype(np.float32), y=rng.integers(0, 16, 128))
    result = run_cli(capsys, "retrain", src, "--data", tmp_path / "d.npz", "-o", out, "--json")
    assert result.code == 0, result.err
    assert result.json()["trainable"] == ["gate/else_branch/W", "gate/then_branch/W"]
    before, after = OnnxModel.load(src), OnnxModel.load(out)
    taken, skipped = "gate/then_branch/W", "gate/else_branch/W"  # the model's condition is a constant True
    assert not np.array_equal(after.weight(taken).array(), before.weight(taken).array())
    assert np.array_equal(after.weight(skipped).array(), before.weight(skipped).array())
    assert [n.op_type for n in after.proto.graph.node] == [n.op_type for n in before.proto.graph.node]


def _small_mlp_with_data(tmp_path, seed: int):
    """A 32-24-4 MLP saved as m.onnx, and 256 random labelled samples for it in d.npz."""
    import numpy as np

    from tests import onnx_factory as factory

    src = factory.save(factory.mlp(sizes=(32, 24, 4)), tmp_path / "m.onnx")
    rng = np.random.default_rng(seed)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(256, 32)).astype(np.float32), y=rng.integers(0, 4, 256))
    return src


def test_recipe_covering_every_tensor_on_npz_data(capsys, tmp_path):
    """Biases too, exact codecs, unlabelled-free npz data: the last layer leaves nothing to retrain."""
    src = _small_mlp_with_data(tmp_path, seed=0)
    recipe = tmp_path / "r.toml"
    recipe.write_text("prune_steps = 1\nbatch_size = 64\n" + "".join(
        f"[[layer]]\nname = '{name}'\nsparsity = {sparsity}\nclusters = 4\ncodec = '{codec}'\n"
        for name, sparsity, codec in [("fc1.weight", 0.5, "auto"), ("fc2.weight", 0.5, "sparse"),
                                      ("fc1.bias", 0.0, "dense"), ("fc2.bias", 0.0, "auto")]))
    blob = tmp_path / "m.wl"
    result = run_cli(capsys, "compress", src, "--data", tmp_path / "d.npz", "--recipe", recipe, "-o", blob, "--json")
    assert result.code == 0, result.err
    codecs = {row["name"]: row["codec"] for row in result.json()["tensors"]}
    assert "raw" not in codecs.values() and codecs["fc2.weight"] == "sparse"
    assert not [row for row in result.json()["steps"] if row["layer"] == "fc1.bias" and "pruned" in row["step"]]
    assert run_cli(capsys, "verify", blob).code == 0


def test_prune_together_prunes_every_layer_in_lockstep_before_the_loop(capsys, tmp_path):
    src = _small_mlp_with_data(tmp_path, seed=1)
    recipe = tmp_path / "r.toml"
    recipe.write_text("prune_steps = 2\nprune_together = true\nbatch_size = 64\n" + "".join(
        f"[[layer]]\nname = '{name}'\nsparsity = {sparsity}\nclusters = 4\ncodec = 'auto'\n"
        for name, sparsity in [("fc1.weight", 0.75), ("fc2.weight", 0.5)]))
    result = run_cli(capsys, "compress", src, "--data", tmp_path / "d.npz", "--recipe", recipe,
                     "-o", tmp_path / "m.wl", "--json")
    assert result.code == 0, result.err
    steps = [(row["layer"], row["step"]) for row in result.json()["steps"]]
    assert steps[1:3] == [(None, "all layers pruned, step 1 of 2"), (None, "all layers pruned, step 2 of 2")]
    assert not [step for layer, step in steps if layer and step.startswith("pruned")]
    sparsity = {row["name"]: 1 - row["nonzeros"] / row["params"] for row in result.json()["tensors"]
                if row["name"].endswith("weight")}
    assert sparsity["fc1.weight"] == pytest.approx(0.75, abs=0.01)
    assert sparsity["fc2.weight"] == pytest.approx(0.5, abs=0.02)
