"""The bundled checkpoints load with today's code, no patient a number is claimed on was seen in training, and every
number of checkpoints/MODEL_CARD.md outside its cross-validation sections (`test_shipped_crossval`) is what the shipped
files give: the card's numbers are parsed from the card itself (`tests.model_card`) and compared with values
recomputed from the checkpoints, pipeline.json, crossval.json and, where present, the real validation patients.

A card row or sentence these modules do not recognise fails (`table`, `claim`), so the card cannot grow a number that
nothing checks. A number is "shown right" when the recomputed value rounds to it at the decimals the card prints.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import nnx

from flaxtumor.config import Config
from flaxtumor.data.io import read_image
from flaxtumor.data.lgg import discover, select
from flaxtumor.data.synthetic import write_synthetic_dataset
from flaxtumor.operating_point import SAFE_POSTPROCESS_RULES
from flaxtumor.checkpoints import load_inference
from tests.data.test_real_data import shared_manifest
from tests.model_card import (  # noqa: F401 (fixtures)
    CHECKPOINTS, CROSSVAL, CV_ROWS, NUMBER, REPO, assert_shown, claim, crossval, pipeline, table,
)


def test_assert_shown_catches_a_wrong_number() -> None:
    assert_shown("ok", ["0.844", "206", "24,098,625"], [0.84426, 206, 24098625])
    for shown, value in (("0.845", 0.84426), ("205", 206), ("0.84", 0.8349)):
        with pytest.raises(AssertionError):
            assert_shown("wrong", [shown], [value])


# -- without the real data -------------------------------------------------------------------------------------------



def _params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def _members() -> list[tuple[Path, dict[str, Any]]]:
    """The shipped segmenter's members (an ensemble of all-patient seeds): (folder, metadata) each."""
    from flaxtumor.ensemble import member_paths
    from flaxtumor.checkpoint_metadata import read_metadata

    folder = CHECKPOINTS / "segmenter"
    paths = member_paths(folder, read_metadata(folder))
    assert paths, "the card describes an ensemble of seeds: checkpoints/segmenter must be one"
    return [(p, json.loads((p / "metadata.json").read_text())) for p in paths]


def test_bundled_checkpoints_fit_the_budget_and_match_what_ships(pipeline) -> None:
    assert _mib(CHECKPOINTS) <= 64
    assert pipeline.metadata["segmenter"]["backbone_init"] == "none"  # the card: "Segmenter: from scratch"
    cls_meta = pipeline.metadata["classifier"]
    assert cls_meta["dtype"] == "bfloat16"
    # "Classifier: in-domain pretraining" on the 65 training patients only, recorded as the backbone's provenance
    provenance = cls_meta["backbone_provenance"]
    assert provenance["source"].startswith("in-domain segmentation pretraining")
    assert sorted(provenance["patients"]) == sorted(cls_meta["split"]["train"])
    assert set(provenance["patients"]).isdisjoint(cls_meta["split"]["val"])
    assert_shown("pretraining", claim(r"encoder \*is\* the classifier's ResNet50 .*?the \*\*(\d+) training patients\*\* "
                                      r"only \(best epoch: validation per-patient Dice ([\d.]+) at (\d+)²\)"),
                 [len(provenance["patients"]), provenance["pretraining_metrics"]["volumetric_dice"],
                  provenance["image_size"]])
    classifier, _ = load_inference(CHECKPOINTS / "classifier")
    members = _members()
    cls_params = _params(classifier)
    seg_params = {_params(load_inference(path)[0]) for path, _ in members}
    assert len(seg_params) == 1  # the members are one architecture
    rows = {r[0]: r for r in table("| file | what | size |")}
    assert_shown("classifier/ row", NUMBER.findall(rows["`classifier/`"][1])[-1:] + NUMBER.findall(rows["`classifier/`"][2]),
                 [cls_params, _mib(CHECKPOINTS / "classifier")])
    n, seeds, patients, params = claim(r"\| `segmenter/` \| (\d+) ResUNets .*?seeds ([\d, and]+), each trained on all "
                                       r"(\d+) patients.*?; ([\d,]+) params each")
    shown = [n, *NUMBER.findall(seeds), patients, params, *NUMBER.findall(rows["`segmenter/`"][2])]
    assert_shown("segmenter/ row", shown,
                 [len(members), *[m["config"]["train"]["seed"] for _, m in members],
                  len(pipeline.metadata["segmenter"]["trained_patients"]), *seg_params,
                  _mib(CHECKPOINTS / "segmenter")])
    head = cls_params - _params(classifier.backbone)
    assert_shown("backbone size", claim(r"classifier's ([\d.]+) M-parameter backbone"), [(cls_params - head) / 1e6])
    assert_shown("segmenter in float32", claim(r"segmenter stays in float32 \(([\d.]+) MiB\)"),
                 [_mib(CHECKPOINTS / "segmenter")])


def test_no_patient_a_number_is_claimed_on_was_seen_in_training(pipeline, crossval) -> None:
    recorded = json.loads((REPO / "configs" / "lgg_split.json").read_text())
    split = pipeline.metadata["classifier"]["split"]  # the classifier's numbers: its 16 validation patients
    assert set(split["val"]).isdisjoint(split["train"]) and set(split["val"]).isdisjoint(split["test"])
    assert sorted(split["train"]) == sorted(recorded["train"]) and sorted(split["val"]) == sorted(recorded["val"])
    n_train, n_val = claim(r"\*\*(\d+) training patients\*\* \(\d+ slices, \d+ with tumour\) and \*\*(\d+) validation")
    assert (int(n_train), int(n_val)) == (len(recorded["train"]), len(recorded["val"]))
    # The segmenter's numbers are out of fold: each patient predicted by the fold model that held it out. The shipped
    # segmenter then trained on every one of those patients, and claims nothing on them.
    patients = sorted(crossval["fold_of"])
    seg = pipeline.metadata["segmenter"]
    assert sorted(seg["trained_patients"]) == patients == sorted(seg["split"]["train"]) and not seg["split"].get("val")
    for _, member in _members():  # every member trained on all of them, and claims nothing on them
        assert sorted(member["trained_patients"]) == patients and not member["split"].get("val")
        assert "no validation metrics" in member["metrics"]["protocol"] and set(member["metrics"]) == {"protocol"}
    assert sorted(crossval["per_patient_dice"]) == patients and crossval["n_patients"] == len(patients)
    assert "no held-out patients" in seg["metrics"]["protocol"]  # the ensemble quotes the cross-validation only
    # ... of its own recipe: each patient by the fold models of the members' seeds, averaged as the members are
    assert crossval["member_seeds"] == [m["config"]["train"]["seed"] for _, m in _members()]
    assert f"each fold's {len(crossval['members'])} models (one per seed) averaged" in seg["metrics"]["protocol"]
    headline = crossval["postprocessing"]["volumetric_dice"]
    assert seg["metrics"]["crossval"] == {k: headline[k] for k in ("mean", "mean_ci95", "median", "worst")}
    assert pipeline.record["tuned_on"]["patients"] == patients  # the operating point: chosen out of fold
    assert pipeline.record["classifier_gate"]["patients"] == split["val"]  # the gate: on the classifier's held-out
    sizes = [sum(f == k for f in crossval["fold_of"].values()) for k in range(crossval["folds"])]
    shown = claim(r"(\d+)-fold cross-validation over all (\d+) patients \(folds of ([\d, and]+) patients")
    assert_shown("folds", shown[:2] + NUMBER.findall(shown[2]), [crossval["folds"], len(patients), *sizes])


def test_the_operating_point_is_the_cross_validated_choice_and_the_gate_decision(pipeline, crossval) -> None:
    point, record = pipeline.point, pipeline.record
    chosen = crossval["postprocessing"]["chosen"]
    assert (point.postprocess, point.min_tumour_area, point.tta) == (chosen["postprocess"], chosen["min_tumour_area"],
                                                                     False)
    # The mask threshold is the cross-validated one, not the segmenter checkpoint's own: pipeline.json carries it.
    assert point.mask_threshold == chosen["mask_threshold"]
    assert_shown("mask threshold", claim(r"\*\*Chosen: `[\w.]+` at mask threshold ([\d.]+), no area gate\*\*: a pixel is "
                                         r"tumour where the averaged probability is at least ([\d.]+)"),
                 [point.mask_threshold] * 2)
    assert point.postprocess in SAFE_POSTPROCESS_RULES
    floor = float(point.postprocess.removeprefix("drop_small_"))
    assert_shown("floor", claim(r"3D components smaller than ([\d.]+) % of one slice's area \((\d+) voxels at 256²\)"),
                 [100 * floor, floor * 256 * 256])
    gate = record["classifier_gate"]
    assert gate["chosen"] in gate["candidates"]
    off = gate["candidates"][0]
    assert off["threshold"] is None  # the classifier off (strict JSON null for inf), the first candidate
    classifier_on = record["threshold"] is not None
    assert classifier_on == (gate["chosen"] != off)  # equal dicts: JSON gives no shared objects
    assert point.gate is (classifier_on or chosen["gate"])
    rows = table("| classifier gate |")
    by_key = {(r["threshold"], r["min_tumour_area"]): r for r in gate["candidates"]}
    assert any(r[-1] == "chosen" for r in rows)
    for cells in rows:
        threshold = None if cells[0] == "off" else float(cells[0])
        r = by_key[(threshold, float(NUMBER.findall(cells[1])[0]) / 100)]
        assert_shown(f"gate {cells[0]}", [NUMBER.findall(c)[0] for c in cells[2:6]],
                     [r[k] for k in ("per_patient_dice_mean", "per_patient_dice_median", "verdict_sensitivity",
                                     "verdict_specificity")])
        assert (cells[-1] == "chosen") == (r == gate["chosen"])


def test_the_training_history_claims(pipeline, crossval) -> None:
    epochs = crossval["recommended_epochs"]["epochs"]
    members = [m for _, m in _members()]
    for seg in members:  # each all-patient run exported its last epoch of the recommended schedule
        assert seg["exported"]["epoch"] == len(seg["history"]) == seg["config"]["train"]["epochs"] == epochs
    # ... which is the folds' own fixed schedule: every fold ran it whole and exported its last epoch
    assert {(f["best_epoch"], f["epochs_trained"]) for f in crossval["recommended_epochs"]["per_fold"]} == {(epochs,
                                                                                                              epochs)}
    assert "last epoch" in crossval["recommended_epochs"]["rule"]
    assert members[0]["config"]["train"]["export_epoch"] == "last"
    shown = claim(r"The shipped models \(seeds ([\d, and]+)\) each trained on all (\d+) patients for (\d+) epochs, the "
                  r"folds' own schedule")
    assert_shown("all-patient runs", [*NUMBER.findall(shown[0]), shown[1], shown[2]],
                 [*[m["config"]["train"]["seed"] for m in members], len(members[0]["trained_patients"]), epochs])
    cls = pipeline.metadata["classifier"]
    auc = [h["val_auc"] for h in cls["history"]]  # the shipped run is phase 3
    assert len(auc) == cls["config"]["train"]["epochs"] and auc == sorted(auc) and len(set(auc)) == len(auc)
    assert claim(r"It was kept because validation said so:\s+its AUC (rose at every epoch)")
    assert_shown("float32 AUC in training", claim(r"bfloat16 classifiers give AUC ([\d.]+) vs [\d.]+ as their "
                                                  r"training measured it")[:1],
                 [cls["metrics"]["auc"]])


def test_architecture_and_recipe_are_the_recorded_configs(pipeline) -> None:
    seg, cls = pipeline.metadata["segmenter"]["config"], pipeline.metadata["classifier"]["config"]
    w1, w2, dropout = claim(r"head GAP → (\d+) → (\d+) → 1 logit, dropout ([\d.]+)")
    assert [int(w1), int(w2)] == list(cls["model"]["head_widths"]) and float(dropout) == cls["model"]["dropout"]
    assert [int(w) for w in claim(r"ResUNet, widths ([\d/]+),")[0].split("/")] == list(seg["model"]["resunet_widths"])
    size, rot, lo, hi, flip, seed = claim(r"Common settings: (\d+)×\1 inputs.*?rotation ±(\d+)°, scaling ([\d.]+)–([\d.]+), "
                                          r"horizontal flip p = ([\d.]+)\) plus mild intensity jitter, seed (\d+)")
    for c in (seg, cls):
        data, train = c["data"], c["train"]
        assert (int(size), float(rot), [float(lo), float(hi)], float(flip)) == (
            data["image_size"], data["rotate_degrees"], list(data["scale_range"]), data["flip_probability"])
        assert int(seed) == train["seed"] and data["normalisation"] == "image_zscore"  # "per-image per-channel z-score"
        batch, decay, clip = claim(r"batch (\d+), AdamW \(weight decay ([\de.-]+)\).*?gradient clipping at ([\d.]+)")
        assert (int(batch), float(decay), float(clip)) == (train["batch_size"], train["weight_decay"], train["grad_clip"])
    # The segmenter's recipe is configs/segmenter_crossval.json, the cross-validation's own config; the shipped model
    # differs only in what --fold all --epochs N sets.
    recipe = json.loads((REPO / "configs" / "segmenter_crossval.json").read_text())
    assert Config.from_dict(recipe).model == Config.from_dict(seg).model
    # what --fold all --epochs N --seed S [--resume] sets, and how often a run saves and plots (not the model)
    run_only = ("epochs", "out_dir", "seed", "resume", "save_every_steps", "plot")
    for _, member in _members():  # every member: the recipe, up to those
        assert {k: v for k, v in recipe["train"].items() if k not in run_only} == \
            {k: v for k, v in member["config"]["train"].items() if k not in run_only}
        same = {"data.fold": None, "data.root": "", **{f"train.{k}": recipe["train"][k] for k in run_only}}
        assert Config.from_dict(member["config"]).override(**same) == Config.from_dict(recipe).override(**same)
    lr, share, per_epoch, epochs, export_epoch = claim(
        r"BCE \+ soft Dice, lr ([\de.-]+), tumour-aware sampling \(uniform share ([\d.]+), (\d+) slices per epoch\); "
        r"each fold a fixed (\d+)-epoch schedule, exporting its last epoch \(`export_epoch: (\w+)`")
    assert (float(lr), float(share), int(per_epoch), int(epochs), export_epoch) == (
        seg["train"]["lr"], seg["data"]["sampling_uniform_share"], seg["data"]["samples_per_epoch"],
        recipe["train"]["epochs"], seg["train"]["export_epoch"]) and export_epoch == "last"
    assert seg["data"]["sampling"] == "tumour" and seg["train"]["loss"] == "bce_dice"
    phases = json.loads((REPO / "configs" / "classifier_indomain.json").read_text())["train"]
    e1, lr1, e2, lr2 = claim(r"the head on the frozen backbone \(its BatchNorm statistics too\) for (\d+) epochs at lr "
                             r"([\de.-]+), then the\s+last stage unfrozen for (\d+) epochs at lr ([\de.-]+)\.")
    assert (int(e1), float(lr1), int(e2)) == (phases["epochs"], phases["lr"], phases["phase2_epochs"])
    assert float(lr2) == pytest.approx(phases["lr"] * phases["phase2_lr_factor"])
    e3, lr3 = claim(r"the whole network from phase 2's best model for (\d+) epochs at lr ([\de.-]+),")
    assert (int(e3), float(lr3)) == (cls["train"]["epochs"], cls["train"]["lr"])
    phase3 = json.loads((REPO / "configs" / "classifier_indomain_phase3.json").read_text())
    assert phase3["train"]["epochs"] == cls["train"]["epochs"] and phase3["train"]["lr"] == cls["train"]["lr"]
    # Compared as configs: a field newer than the file (e.g. model.deep_supervision) reads as its default.
    assert Config.from_dict(cls).model == Config.from_dict(phase3).model
    assert cls["train"]["init_from"].endswith("cls_indomain/classifier")


def test_bundled_pipeline_predicts_a_synthetic_volume(pipeline, tmp_path) -> None:
    root = write_synthetic_dataset(tmp_path, n_patients=1, n_slices=8, size=200, seed=5)
    folder = next(p for p in root.iterdir() if p.is_dir())
    images = [read_image(folder / f"{folder.name}_{i}.tif") for i in range(1, 9)]
    preds = pipeline.predict_volume(images)
    assert len(preds) == 8
    for p in preds:
        assert p.mask.shape == (200, 200) and p.mask.dtype == bool and 0.0 <= p.tumour_probability <= 1.0


# -- on the real validation patients ------------------------------------------------------------------------------


@contextlib.contextmanager
def optimised_jax() -> Iterator[None]:
    """Full XLA optimisation for the real-data runs: tests/conftest.py turns most of it off for fast compiles, which
    makes a ResNet50 over 570 slices several times slower. The flag is read at compile time."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture(scope="module")
def evaluated(lgg_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """metrics.json of the card's two evaluate commands on the classifier's validation patients: as shipped, and with
    --threshold 0.5. Only their classifier numbers are claimed: the segmenter trained on these patients."""
    from flaxtumor.evaluate import main

    runs = {}
    split = ["--split", str(REPO / "configs" / "lgg_split.json")]
    for name, extra in (("shipped", []), ("at 0.5", ["--threshold", "0.5"])):
        out = tmp_path_factory.mktemp("eval")
        with optimised_jax():
            assert main(["--data", str(lgg_root), "--checkpoints", str(CHECKPOINTS), "--out", str(out), *split,
                         *extra]) == 0
        runs[name] = json.loads((out / "metrics.json").read_text())
    return runs


# Each row of the card's validation table (its label with numbers as #) → the recomputed numbers, in the order the
# label and the value show them. m: evaluate as shipped; h: evaluate --threshold 0.5.
VALIDATION_ROWS: dict[str, Callable[[dict, dict], list[float]]] = {
    "AUC": lambda m, h: [m["classifier"]["auc"]],
    "at threshold #: accuracy / precision / recall / F1": lambda m, h: [
        h["classifier"][k] for k in ("threshold", "accuracy", "precision", "recall", "f1")],
    "at the operating threshold #: accuracy / sensitivity / specificity / ECE": lambda m, h: [
        m["classifier"][k] for k in ("threshold", "accuracy", "sensitivity", "specificity", "ece")],
    "Grad-CAM pointing score, # slices": lambda m, h: [
        m["classifier"]["gradcam"]["pointing_slices"], m["classifier"]["gradcam"]["pointing_score"]],
}
OPERATING_ROW = "at the operating threshold #: accuracy / sensitivity / specificity / ECE"


def _operating_row_expected(m: dict, h: dict) -> bool:
    """The card shows the classifier at the operating point only where it flags slices at another threshold than the
    0.5 row's (with the classifier off, or flags at 0.5, the row would repeat that one)."""
    on = json.loads((CHECKPOINTS / "pipeline.json").read_text())["threshold"] is not None
    return on and m["classifier"]["threshold"] != h["classifier"]["threshold"]


@pytest.mark.realdata
def test_evaluate_reproduces_every_number_of_the_validation_table(evaluated) -> None:
    m, h = evaluated["shipped"], evaluated["at 0.5"]
    assert m["protocol"]["patients"] == json.loads((REPO / "configs" / "lgg_split.json").read_text())["val"]
    assert m["protocol"]["classifier_train_overlap"] == []  # no evaluated patient in the classifier's training split
    assert m["protocol"]["segmenter_train_overlap"] == m["protocol"]["patients"]  # why no pipeline row is claimed
    rows = table("| | metric | value | target |")
    labels = [NUMBER.sub("#", cells[1]) for cells in rows]
    expected = [k for k in VALIDATION_ROWS if k != OPERATING_ROW or _operating_row_expected(m, h)]
    assert sorted(labels) == sorted(expected), "a card row without a check, or a check without its row"
    for cells, label in zip(rows, labels):
        assert_shown(cells[1], NUMBER.findall(cells[1]) + NUMBER.findall(cells[2]), VALIDATION_ROWS[label](m, h))


def _cv(f: Callable[[dict], list[float]]) -> Callable[[dict, dict], list[float]]:
    """A README row from crossval.json's post-processed block (the shipped point), by CV_ROWS' rule."""
    return lambda m, h: f(json.loads(CROSSVAL.read_text())["postprocessing"])


# The README's Results table, row by row, as VALIDATION_ROWS.
README_ROWS: dict[str, Callable[[dict, dict], list[float]]] = {
    "per-patient volumetric Dice, mean [#% CI] (out of fold, # patients)": _cv(
        lambda b: [95, len(b["per_patient_dice"]), *CV_ROWS["per-patient Dice, mean [95% CI]"](b)]),
    "per-patient volumetric Dice, median / worst patient": _cv(
        lambda b: [b["volumetric_dice"]["median"], b["volumetric_dice"]["worst"]]),
    "tumour-slice Dice (empty-vs-empty slices excluded) [#% CI]": _cv(
        lambda b: [95, *CV_ROWS["tumour-slice Dice [95% CI]"](b)]),
    "classifier AUC; accuracy at # (# validation patients)": lambda m, h: [
        h["classifier"]["threshold"], m["protocol"]["n_patients"], m["classifier"]["auc"], h["classifier"]["accuracy"]],
    "classifier Grad-CAM pointing score (# slices)": lambda m, h: [
        m["classifier"]["gradcam"]["pointing_slices"], m["classifier"]["gradcam"]["pointing_score"]],
}


@pytest.mark.realdata
def test_the_readme_results_table(evaluated) -> None:
    lines = (REPO / "README.md").read_text().split("## Results", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| metric |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("**", "") for c in line.strip().strip("|").split("|")])
    labels = [NUMBER.sub("#", cells[0]) for cells in rows]
    assert sorted(labels) == sorted(README_ROWS), "a README result without a check, or a check without its row"
    for cells, label in zip(rows, labels):
        values = README_ROWS[label](evaluated["shipped"], evaluated["at 0.5"])
        assert_shown(f"README: {cells[0]}", NUMBER.findall(cells[0]) + NUMBER.findall(cells[1]), values)


@pytest.mark.realdata
def test_the_cards_prose_numbers_on_the_real_data(evaluated, lgg_root: Path) -> None:
    m = evaluated["shipped"]
    protocol = m["protocol"]
    assert_shown("protocol", claim(r"Protocol: the (\d+) validation patients of `configs/lgg_split.json` \((\d+) "
                                   r"slices, (\d+) with tumour\)"),
                 [protocol["n_patients"], protocol["n_slices"], protocol["n_tumour_slices"]])
    patients = discover(lgg_root)
    split = json.loads((REPO / "configs" / "lgg_split.json").read_text())
    counts = []
    for part in ("train", "val"):
        chosen = select(patients, split[part])
        counts += [len(chosen), sum(len(p.slices) for p in chosen), sum(s.has_tumour for p in chosen for s in p.slices)]
    assert_shown("split", claim(r"\*\*(\d+) training patients\*\* \((\d+) slices, (\d+) with tumour\) and \*\*(\d+) "
                                r"validation patients\*\* \((\d+) slices, (\d+) with tumour\)"), counts)
    if {p.patient_id for p in patients} == shared_manifest():  # the card describes our 81-patient copy
        slices = [s for p in patients for s in p.slices]
        assert_shown("data", claim(r"Of the public 110 patients, (\d+) were available to us \((\d+) slices, (\d+) "
                                   r"with tumour\)"), [len(patients), len(slices), sum(s.has_tumour for s in slices)])
    auc = m["classifier"]["auc"]
    assert_shown("bfloat16", claim(r"and [\d.]+ vs ([\d.]+) with the grey-background repair"), [auc])
    c, h = m["classifier"], evaluated["at 0.5"]["classifier"]
    shown = claim(r"\| \*\*\(c\) \(b\) \+ phase 3 \(shipped, bfloat16\)\*\* \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \| "
                  r"([\d.]+) / ([\d.]+) \| ([\d.]+) \| \*\*([\d.]+)\*\* \|")
    assert_shown("classifier (c) row", shown, [auc, h["accuracy"], h["recall"], h["specificity"], h["ece"],
                                              c["gradcam"]["pointing_score"]])
    assert_shown("progress", claim(r"lifted AUC from\s+[\d.]+ to ([\d.]+) and the Grad-CAM pointing score from "
                                   r"[\d.]+ to ([\d.]+)"), [auc, c["gradcam"]["pointing_score"]])
    assert_shown("recall at 0.5", claim(r"At 0.5 it misses about one tumour slice in \w+ \(recall ([\d.]+)\)"),
                 [h["recall"]])
