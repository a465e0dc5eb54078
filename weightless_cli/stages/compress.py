"""The Weightless loop (Reagen et al. 2018, §4): compress layer by layer, retraining around the errors.

For each layer of the recipe, in order:

1. gradual magnitude pruning to its target sparsity, retraining between steps
   (the cubic schedule of Zhu & Gupta 2017: most weights go early, the last few gently);
   with ``prune_together`` every layer is pruned in the same steps before the loop starts,
   so the whole network adapts at once and each retraining epoch serves every layer;
2. k-means weight sharing to K values, then retraining of the centroids;
3. encoding, and replacing the layer by its *decoded* weights — the filter's false
   positives included — so that the network learns to live with them;
4. freezing the layer, and retraining the layers that are not yet frozen.

Then the blob is written from the records made in step 3 (later retraining never
touches a frozen layer, so those records stay exact). Accuracy and size are measured
after every step.
"""

from __future__ import annotations

import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from weightless_cli.codecs.container import save_blob
from weightless_cli.data.datasets import Dataset, load_dataset
from weightless_cli.errors import BadInputError, UsageError
from weightless_cli.fileio import read_input_bytes
from weightless_cli.model import OnnxModel, Selection
from weightless_cli.stages.decode import decode_blob, decode_record
from weightless_cli.stages.encode import (
    CODEC_CHOICES,
    EncodedTensor,
    assemble_blob,
    encode_tensor,
    file_summary,
)
from weightless_cli.stages.evaluate import evaluate, model_input_shape
from weightless_cli.stages.prune import prune_array, sparsity_of
from weightless_cli.stages.quantize import quantize_array
from weightless_cli.stages.retrain import TrainSettings, retrain_model, teacher_logits, trainable_names
from weightless_cli.train import LR_SCHEDULES


@dataclass(frozen=True)
class LayerPlan:
    """How to compress one tensor."""

    name: str
    sparsity: float
    clusters: int
    t: int | None = None
    fp_bits: int | None = 6
    codec: str = "bloomier"  # or an exact codec, or auto (see encode --codec)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a compress run, so that a run can be repeated exactly."""

    layers: tuple[LayerPlan, ...]
    prune_steps: int = 3
    prune_epochs: int = 1
    prune_together: bool = False
    centroid_epochs: int = 1
    retrain_epochs: int = 1
    final_epochs: int = 0
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine", annealed to zero within every retraining
    batch_size: int = 128
    train_limit: int | None = None
    distill: bool = True
    max_fp_ratio: float | None = None  # for codec = "auto": accept bloomier up to this many FP per nonzero
    seed: int = 0
    description: str = ""
    _source: str = field(default="", compare=False)


def _typed(cls: type, table: dict, where: str) -> dict:
    known = {f.name: f for f in fields(cls) if not f.name.startswith("_") and f.name != "layers"}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dict(table)


def load_recipe(path: Path) -> Recipe:
    """Read a TOML recipe: top-level settings and one ``[[layer]]`` table per tensor, in order."""
    try:
        document = tomllib.loads(read_input_bytes(path).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"not a valid TOML recipe: {exc}", path) from None
    layer_tables = document.pop("layer", [])
    if not isinstance(layer_tables, list) or not layer_tables:
        raise BadInputError("a recipe needs at least one [[layer]] table", path)
    try:
        layers = tuple(LayerPlan(**_layer_keys(table, path)) for table in layer_tables)
        recipe = Recipe(layers=layers, **_typed(Recipe, document, str(path)), _source=str(path))
    except TypeError as exc:
        raise BadInputError(f"bad recipe: {exc}", path) from None
    check_recipe(recipe, path)
    return recipe


def _layer_keys(table: dict, path: Path) -> dict:
    known = {f.name for f in fields(LayerPlan)}
    unknown = sorted(set(table) - known)
    if unknown or "name" not in table:
        raise BadInputError(f"[[layer]] {table.get('name', '?')}: needs name, sparsity, clusters; "
                            f"unknown key(s): {', '.join(unknown) or 'none'}", path)
    if "t" in table and "fp_bits" not in table:
        table = {**table, "fp_bits": None}
    return table


def check_recipe(recipe: Recipe, where: object) -> None:
    for plan in recipe.layers:
        if not 0 <= plan.sparsity < 1:
            raise UsageError(f"layer {plan.name}: sparsity {plan.sparsity} is outside [0, 1)", where)
        if not 1 <= plan.clusters <= 65535:
            raise UsageError(f"layer {plan.name}: clusters {plan.clusters} is outside 1..65535", where)
        if plan.codec not in CODEC_CHOICES:
            raise UsageError(f"layer {plan.name}: unknown codec {plan.codec!r}; choose from "
                             f"{', '.join(CODEC_CHOICES)}", where)
    if recipe.lr_schedule not in LR_SCHEDULES:
        raise UsageError(f"lr_schedule {recipe.lr_schedule!r}: choose from {', '.join(LR_SCHEDULES)}", where)
    if recipe.prune_steps < 1 or min(recipe.prune_epochs, recipe.centroid_epochs, recipe.retrain_epochs,
                                     recipe.final_epochs) < 0:
        raise UsageError("prune_steps must be ≥ 1 and epochs ≥ 0", where)


def default_recipe(model: OnnxModel, selection: Selection) -> Recipe:
    """Without a recipe: every selected tensor at 90 % sparsity, 8 clusters, t = 3 + 6 bits."""
    return Recipe(layers=tuple(LayerPlan(t.name, 0.9, 8) for t in selection.apply(model)), _source="default")


def gradual_sparsities(target: float, steps: int) -> list[float]:
    """Zhu & Gupta's cubic schedule from 0 to ``target`` in ``steps`` steps."""
    return [target * (1 - (1 - step / steps) ** 3) for step in range(1, steps + 1)]


@dataclass
class _Loop:
    """State of one compress run: the model, what is frozen and encoded, the step log."""

    model: OnnxModel
    train: Dataset
    test: Dataset
    recipe: Recipe
    log: Callable[[dict], None]
    teacher: np.ndarray | None = None
    frozen: list[str] = field(default_factory=list)
    encoded: dict[str, EncodedTensor] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def retrain(self, epochs: int) -> None:
        if epochs <= 0 or not trainable_names(self.model, tuple(self.frozen))[0]:
            return  # nothing asked, or every tensor is already encoded and frozen
        settings = TrainSettings(epochs=epochs, lr=self.recipe.lr, batch_size=self.recipe.batch_size,
                                 seed=self.recipe.seed + len(self.steps), lr_schedule=self.recipe.lr_schedule)
        retrain_model(self.model, self.train.x, self.train.y, tuple(self.frozen), settings, self.teacher)

    def measure(self, layer: str | None, step: str) -> dict:
        result = evaluate(self.model.proto.SerializeToString(), self.test)
        row = {"layer": layer, "step": step, "accuracy": result.accuracy, "error": result.error,
               "weights_bytes": self.weights_bytes(), "seconds": round(time.perf_counter() - self.started, 1)}
        if layer is not None:
            tensor = self.model.weight(layer)
            values = tensor.array()
            row.update(sparsity=sparsity_of(values), distinct=int(np.unique(values[values != 0]).size))
        self.steps.append(row)
        self.log(row)
        return row

    def weights_bytes(self) -> int:
        """Encoded layers at their encoded size, every other tensor at its stored size."""
        return sum(self.encoded[t.name][1]["encoded_bytes"] if t.name in self.encoded else t.nbytes
                   for t in self.model.weights if not t.quantized)

    def prune_together(self) -> None:
        """Every layer's gradual pruning, step by step in lockstep, retraining the whole network between steps."""
        plans = [plan for plan in self.recipe.layers if plan.sparsity > 0]
        schedules = [gradual_sparsities(plan.sparsity, self.recipe.prune_steps) for plan in plans]
        for step in range(self.recipe.prune_steps):
            for plan, schedule in zip(plans, schedules, strict=True):
                tensor = self.model.weight(plan.name)
                tensor.set_array(prune_array(tensor.array(), schedule[step]))
            self.retrain(self.recipe.prune_epochs)
            self.measure(None, f"all layers pruned, step {step + 1} of {self.recipe.prune_steps}")

    def compress_layer(self, plan: LayerPlan) -> None:
        self.prepare_layer(plan)
        self.encode_layer(plan)

    def prepare_layer(self, plan: LayerPlan) -> None:
        """Prune gradually, cluster, retrain the centroids."""
        tensor = self.model.weight(plan.name)
        if plan.sparsity > 0 and not self.recipe.prune_together:  # e.g. biases are only clustered
            for sparsity in gradual_sparsities(plan.sparsity, self.recipe.prune_steps):
                tensor.set_array(prune_array(tensor.array(), sparsity))
                self.retrain(self.recipe.prune_epochs)
            self.measure(plan.name, f"pruned to {plan.sparsity:.1%}")
        tensor.set_array(quantize_array(tensor.float_array(), plan.clusters))
        self.measure(plan.name, f"clustered to {plan.clusters}")
        self.retrain(self.recipe.centroid_epochs)
        self.measure(plan.name, "centroids retrained")

    def encode_layer(self, plan: LayerPlan) -> dict:
        """Encode, put the decoded weights (false positives in) back, freeze, retrain the rest."""
        tensor = self.model.weight(plan.name)
        record, row = encode_tensor(tensor, plan.codec, plan.t, plan.fp_bits, self.recipe.seed,
                                    self.recipe.max_fp_ratio)
        tensor.set_array(decode_record(record))
        self.encoded[plan.name] = (record, row)
        self.frozen.append(plan.name)
        how = (f"bloomier t={row['t']} (~{row['expected_false_positives']:.0f} false positives)"
               if record.codec == "bloomier" else f"{record.codec} (exact)")
        self.measure(plan.name, f"encoded: {how}")
        self.retrain(self.recipe.retrain_epochs)
        self.measure(plan.name, "later layers retrained")
        return row


def _open_loop(source: Path, train_spec: str, test_spec: str, recipe: Recipe, log: Callable[[dict], None],
               test_limit: int | None) -> _Loop:
    """Load the model and both datasets, check the recipe against them, and take the teacher's logits."""
    model = OnnxModel.load(source)
    missing = [plan.name for plan in recipe.layers if plan.name not in {t.name for t in model.weights}]
    if missing:
        raise UsageError(f"recipe {recipe._source} names tensor(s) not in the model: {', '.join(missing)}", source)
    shape = model_input_shape(source)
    train = load_dataset(train_spec, shape, recipe.train_limit)
    test = load_dataset(test_spec, shape, test_limit)
    if train.y is None and not recipe.distill:
        raise UsageError("the training data has no labels; set distill = true in the recipe", source)
    loop = _Loop(model, train, test, recipe, log)
    if recipe.distill:
        loop.teacher = teacher_logits(model, train.x)  # before any change: the original is the teacher
    return loop


def compress_file(source: Path, target: Path, train_spec: str, test_spec: str, recipe: Recipe,
                  log: Callable[[dict], None] = lambda row: None, test_limit: int | None = None) -> dict:
    """Run the Weightless loop on ``source`` and write the blob ``target``; return the report."""
    loop = _open_loop(source, train_spec, test_spec, recipe, log, test_limit)
    model, train, test = loop.model, loop.train, loop.test
    baseline = loop.measure(None, "original")
    if recipe.prune_together:
        loop.prune_together()
    for plan in recipe.layers:
        loop.compress_layer(plan)
    if recipe.final_epochs:
        loop.retrain(recipe.final_epochs)
        loop.measure(None, "final retraining")
    blob, rows = assemble_blob(model, loop.encoded, recipe.seed)
    blob_bytes = save_blob(target, blob)
    # Measure the artifact itself, decoded from the bytes on disk.
    decoded = decode_blob(blob, target)
    final = evaluate(decoded.proto.SerializeToString(), test)
    summary = file_summary(source.stat().st_size, blob_bytes, rows)
    return {"input": str(source), "output": str(target), "recipe": recipe._source, "train": train.name,
            "test": test.name, "steps": loop.steps, "tensors": rows, "file": summary,
            "accuracy_before": baseline["accuracy"], "accuracy_after": final.accuracy,
            "error_before": baseline["error"], "error_after": final.error,
            "seconds": round(time.perf_counter() - loop.started, 1), "log2_ratio": math.log2(summary["ratio"])}


def sweep_t(source: Path, train_spec: str, test_spec: str, recipe: Recipe, layer: str, ts: list[int],
            log: Callable[[dict], None] = lambda row: None, test_limit: int | None = None) -> list[dict]:
    """Size and accuracy of one layer encoded at each t, after retraining the later layers.

    The layers before ``layer`` in the recipe are compressed first, and ``layer`` is
    pruned, clustered and centroid-retrained once; every t then starts from that state.
    """
    plans = {plan.name: plan for plan in recipe.layers}
    if layer not in plans:
        raise UsageError(f"layer {layer} is not in the recipe")
    loop = _open_loop(source, train_spec, test_spec, recipe, log, test_limit)
    model = loop.model
    if recipe.prune_together:
        loop.prune_together()
    for plan in recipe.layers[: [p.name for p in recipe.layers].index(layer)]:
        loop.compress_layer(plan)
    loop.prepare_layer(plans[layer])
    prepared = model.proto.SerializeToString()
    baseline = loop.steps[-1]
    rows = []
    for t in ts:
        model.proto.ParseFromString(prepared)
        loop.model = OnnxModel.from_proto(model.proto, source)
        loop.frozen = [name for name in loop.frozen if name != layer]
        encoded = loop.encode_layer(LayerPlan(layer, plans[layer].sparsity, plans[layer].clusters, t=t,
                                              fp_bits=None, codec="bloomier"))
        after = loop.steps[-1]
        rows.append({"t": t, "bits": encoded["bits"], "bytes": encoded["encoded_bytes"],
                     "bits_per_nonzero": encoded["bits_per_nonzero"],
                     "expected_false_positives": encoded["expected_false_positives"],
                     "error_before_encoding": baseline["error"], "error_after_retraining": after["error"]})
    return rows
