"""The bundled checkpoints load with today's code, no validation patient was seen in training, and every number of
checkpoints/MODEL_CARD.md is what the shipped files give: the card's numbers are parsed from the card itself and
compared with values recomputed from the checkpoints, pipeline.json and (where present) the real validation patients.

A card row or sentence this module does not recognise fails (`_row_values`, `claim`), so the card cannot grow a number
that nothing checks. A number is "shown right" when the recomputed value rounds to it at the decimals the card prints.
"""

from __future__ import annotations

import contextlib
import json
import re
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
from flaxtumor.inference import Pipeline
from flaxtumor.operating_point import SAFE_POSTPROCESS_RULES
from flaxtumor.checkpoints import load_inference
from tests.data.test_real_data import shared_manifest

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO / "checkpoints"
CARD = CHECKPOINTS / "MODEL_CARD.md"
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")  # not the 1 of "F1"


# -- reading the card -----------------------------------------------------------------------------------------------


def card() -> str:
    """The card as one line per paragraph (prose wraps anywhere), tables kept line by line."""
    return re.sub(r"(?<=[^|\n])\n *(?=[^|\n ])", " ", CARD.read_text())


def claim(pattern: str) -> list[str]:
    """The numbers a sentence of the card states; the sentence must still be there."""
    m = re.search(pattern, card())
    assert m, f"{CARD.name} no longer states /{pattern}/: update the card and this test together"
    return [g for g in m.groups() if g is not None]


def table(header: str) -> list[list[str]]:
    """The rows (cells without ** markup) of the table whose header line starts with `header`."""
    lines = card().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip().replace("**", "") for c in line.strip().strip("|").split("|")])
    return rows


def assert_shown(where: str, shown: list[str], values: list[float]) -> None:
    assert len(shown) == len(values), f"{where}: the card shows {shown}, expected {len(values)} numbers"
    for text, value in zip(shown, values):
        text = text.rstrip(".")  # a number that ends a sentence
        decimals = len(text.split(".")[1]) if "." in text else 0
        assert abs(float(text.replace(",", "")) - value) <= 0.5 * 10**-decimals + 1e-9, (
            f"{where}: the card says {text}, the shipped files give {value:.6g}")


def test_assert_shown_catches_a_wrong_number() -> None:
    assert_shown("ok", ["0.844", "206", "24,098,625"], [0.84426, 206, 24098625])
    for shown, value in (("0.845", 0.84426), ("205", 206), ("0.84", 0.8349)):
        with pytest.raises(AssertionError):
            assert_shown("wrong", [shown], [value])


# -- without the real data -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.from_checkpoints(CHECKPOINTS)


def _params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


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
    segmenter, _ = load_inference(CHECKPOINTS / "segmenter")
    cls_params, seg_params = _params(classifier), _params(segmenter)
    rows = {r[0]: r for r in table("| file | what | size |")}
    assert_shown("classifier/ row", NUMBER.findall(rows["`classifier/`"][1])[-1:] + NUMBER.findall(rows["`classifier/`"][2]),
                 [cls_params, _mib(CHECKPOINTS / "classifier")])
    assert_shown("segmenter/ row", NUMBER.findall(rows["`segmenter/`"][1])[-1:] + NUMBER.findall(rows["`segmenter/`"][2]),
                 [seg_params, _mib(CHECKPOINTS / "segmenter")])
    head = cls_params - _params(classifier.backbone)
    assert_shown("backbone size", claim(r"classifier's ([\d.]+) M-parameter backbone"), [(cls_params - head) / 1e6])
    assert_shown("segmenter in float32", claim(r"segmenter stays in float32 \(([\d.]+) MiB\)"),
                 [_mib(CHECKPOINTS / "segmenter")])


def test_no_validation_patient_was_seen_in_training(pipeline) -> None:
    recorded = json.loads((REPO / "configs" / "lgg_split.json").read_text())
    for name in ("classifier", "segmenter"):
        split = pipeline.metadata[name]["split"]
        assert set(split["val"]).isdisjoint(split["train"]) and set(split["val"]).isdisjoint(split["test"])
        assert sorted(split["train"]) == sorted(recorded["train"]) and sorted(split["val"]) == sorted(recorded["val"])
    assert pipeline.record["tuned_on"]["patients"] == pipeline.metadata["segmenter"]["split"]["val"]
    n_train, n_val = claim(r"\*\*(\d+) training patients\*\* \(\d+ slices, \d+ with tumour\) and \*\*(\d+) validation")
    assert (int(n_train), int(n_val)) == (len(recorded["train"]), len(recorded["val"]))


def test_the_operating_point_and_its_ablation_are_pipeline_json(pipeline) -> None:
    point = pipeline.record
    threshold, area_pct, area_px = claim(r"probability is ≥ \*\*([\d.]+)\*\*, or when the segmenter's mask covers ≥ "
                                         r"\*\*([\d.]+) %\*\* of the slice \((\d+) px at 256²\)")
    assert_shown("threshold", [threshold, area_pct, area_px],
                 [point["threshold"], 100 * point["min_tumour_area"], point["min_tumour_area"] * 256 * 256])
    assert point["tta"] is False and point["gate"] is True
    assert claim(r"\*\*Post-processing: ([\w.]+)\.\*\* \*\*Flip TTA: (off)\*\*") == [point["postprocess"], "off"]
    assert point["postprocess"] in SAFE_POSTPROCESS_RULES
    floor = float(point["postprocess"].removeprefix("drop_small_"))
    assert_shown("floor", claim(r"3D components smaller than ([\d.]+) % of one slice's area \((\d+) voxels at 256²\)"),
                 [100 * floor, floor * 256 * 256])
    rows = {r["name"]: r for r in point["ablation"]}
    lcc, chosen = rows["chosen, with the largest component instead"], rows["chosen operating point"]
    assert_shown("LCC", claim(r"it would have scored ([\d.]+); the safe rule gives up that ([\d.]+)\."),
                 [lcc["per_patient_dice_mean"], lcc["per_patient_dice_mean"] - chosen["per_patient_dice_mean"]])
    grid = point["tuned_on"]["grid"]
    lo, hi, area_lo, area_hi = claim(r"classifier thresholds \(([\d.]+)…([\d.]+)\), fused-gate areas \(([\d.]+)…([\d.]+) %")
    assert_shown("grid", [lo, hi, area_lo, area_hi], [min(grid["threshold"]), max(grid["threshold"]),
                                                      100 * min(grid["min_tumour_area"]), 100 * max(grid["min_tumour_area"])])
    shown = claim(r"breaking them by Youden's J gives the same Dice \(([\d.]+)\) with specificity ([\d.]+) and "
                  r"sensitivity ([\d.]+) instead of")
    assert_shown("re-tuned point", shown, [chosen["per_patient_dice_mean"], chosen["detection_specificity"],
                                           chosen["detection_sensitivity"]])
    assert_ablation_table(point["ablation"])


def assert_ablation_table(ablation: list[dict[str, Any]]) -> None:
    """Every row of the card's ablation table equals pipeline.json's row of that name, cell by cell."""
    by_name = {r["name"]: r for r in ablation}
    onoff = {"on": True, "off": False}
    rows = table("| configuration |")
    assert len(rows) >= 8
    for cells in rows:
        name = re.sub(r" \(slice calls from the segmenter's area alone\)$", " (area-only calls)", cells[0])
        assert name in by_name, f"ablation row {cells[0]!r} is not in pipeline.json"
        r = by_name[name]
        if cells[1] == "off":  # classifier off: a threshold no probability reaches (null in strict JSON)
            assert r["threshold"] in (None, float("inf"))
        else:
            assert_shown(f"{name}: threshold", [cells[1]], [r["threshold"]])
        assert (cells[3], onoff[cells[4]]) == (r["postprocess"], r["gate"]), name
        keys = ("min_tumour_area", "per_patient_dice_mean", "per_patient_dice_median", "detection_accuracy",
                "detection_sensitivity", "detection_specificity")
        assert_shown(name, [cells[2], *cells[5:]], [r[k] for k in keys])


def test_the_classifier_off_claims_are_the_recorded_ablation(pipeline) -> None:
    rows = {r["name"]: r for r in pipeline.record["ablation"]}
    off, chosen = rows["classifier off (area-only calls)"], rows["chosen operating point"]
    shown = claim(r"give the same per-patient Dice \(([\d.]+)\) and better slice calls \(accuracy ([\d.]+) "
                  r"and specificity ([\d.]+), against ([\d.]+) and ([\d.]+) shipped\), at a lower sensitivity "
                  r"\(([\d.]+) against ([\d.]+)\)\. The segmenter alone with the same post-processing also reaches "
                  r"([\d.]+)\.")
    assert_shown("classifier off", shown, [
        off["per_patient_dice_mean"], off["detection_accuracy"], off["detection_specificity"],
        chosen["detection_accuracy"], chosen["detection_specificity"], off["detection_sensitivity"],
        chosen["detection_sensitivity"], rows["segmenter alone + post-processing (no gate)"]["per_patient_dice_mean"]])
    alone = rows["segmenter alone + post-processing (no gate)"]
    assert alone["postprocess"] == chosen["postprocess"] and alone["gate"] is False
    assert round(off["per_patient_dice_mean"], 4) == round(chosen["per_patient_dice_mean"], 4)  # "the same"


def test_the_training_history_claims(pipeline) -> None:
    history = pipeline.metadata["segmenter"]["history"]
    dice = {h["epoch"]: h["val_volumetric_dice"] for h in history}
    best = pipeline.metadata["segmenter"]["best"]["epoch"]
    assert [int(x) for x in claim(r"the segmenter's best epoch \((\d+) of (\d+)\)")] == [best, len(history)]
    assert max(dice.values()) == dice[best]
    cls = pipeline.metadata["classifier"]
    auc = [h["val_auc"] for h in cls["history"]]  # the shipped run is phase 3
    assert len(auc) == cls["config"]["train"]["epochs"] and auc == sorted(auc) and len(set(auc)) == len(auc)
    assert claim(r"It was kept because validation said so:\s+its AUC (rose at every epoch)")
    assert_shown("float32 AUC in training", claim(r"bfloat16 classifiers give AUC ([\d.]+) vs [\d.]+\.")[:1],
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
    lr, epochs, patience = claim(r"soft Dice, lr ([\de.-]+), (\d+) epochs, early stopping on per-patient Dice \(patience (\d+)\)")
    assert (float(lr), int(epochs), int(patience)) == (seg["train"]["lr"], seg["train"]["epochs"], seg["train"]["patience"])
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
    """metrics.json of the card's two evaluate commands: as shipped, and with --threshold 0.5."""
    from flaxtumor.evaluate import main

    runs = {}
    for name, extra in (("shipped", []), ("at 0.5", ["--threshold", "0.5"])):
        out = tmp_path_factory.mktemp("eval")
        with optimised_jax():
            assert main(["--data", str(lgg_root), "--checkpoints", str(CHECKPOINTS), "--out", str(out), *extra]) == 0
        runs[name] = json.loads((out / "metrics.json").read_text())
    return runs


def _ablation_row(name: str) -> dict[str, Any]:
    point = json.loads((CHECKPOINTS / "pipeline.json").read_text())
    return next(r for r in point["ablation"] if r["name"] == name)


# Each row of the card's validation table (its label with numbers as #) → the recomputed numbers, in the order the
# label and the value show them. m: evaluate as shipped; h: evaluate --threshold 0.5.
VALIDATION_ROWS: dict[str, Callable[[dict, dict], list[float]]] = {
    "per-patient Dice, mean": lambda m, h: [m["pipeline"]["per_patient_dice"]["mean"]],
    "per-patient Dice, median / min": lambda m, h: [m["pipeline"]["per_patient_dice"][k] for k in ("median", "min")],
    "tumour-slice Dice (IoU), # slices": lambda m, h: [
        m["pipeline"]["n_scored_slices"], m["pipeline"]["tumour_slice_dice"], m["pipeline"]["tumour_slice_iou"]],
    "slice calls: accuracy / sensitivity / specificity": lambda m, h: [
        m["pipeline"]["detection"][k] for k in ("accuracy", "recall", "specificity")],
    "slice calls with the classifier off (ablation above): accuracy / sensitivity / specificity": lambda m, h: [
        _ablation_row("classifier off (area-only calls)")[f"detection_{k}"]
        for k in ("accuracy", "sensitivity", "specificity")],  # recorded; test_tune_reproduces_... recomputes it
    "pooled Dice / pooled IoU / pixel accuracy (labelled extra)": lambda m, h: [
        m["pipeline"][k] for k in ("pooled_dice", "pooled_iou", "pooled_pixel_accuracy")],
    "AUC": lambda m, h: [m["classifier"]["auc"]],
    "at threshold #: accuracy / precision / recall / F1": lambda m, h: [
        h["classifier"][k] for k in ("threshold", "accuracy", "precision", "recall", "f1")],
    "at the operating threshold #: accuracy / sensitivity / specificity / ECE": lambda m, h: [
        m["classifier"][k] for k in ("threshold", "accuracy", "sensitivity", "specificity", "ece")],
    "Grad-CAM pointing score, # slices": lambda m, h: [
        m["classifier"]["gradcam"]["pointing_slices"], m["classifier"]["gradcam"]["pointing_score"]],
    "on the # tumour slices: Dice / IoU": lambda m, h: [
        m["segmenter"][k] for k in ("n_slices", "dice_mean", "iou_mean")],
}


@pytest.mark.realdata
def test_evaluate_reproduces_every_number_of_the_validation_table(evaluated) -> None:
    m, h = evaluated["shipped"], evaluated["at 0.5"]
    assert m["protocol"]["patients"] == json.loads((REPO / "configs" / "lgg_split.json").read_text())["val"]
    assert m["protocol"]["classifier_train_overlap"] == []  # no evaluated patient in the classifier's training split
    rows = table("| | metric | value | target |")
    labels = [NUMBER.sub("#", cells[1]) for cells in rows]
    assert sorted(labels) == sorted(VALIDATION_ROWS), "a card row without a check, or a check without its row"
    for cells, label in zip(rows, labels):
        assert_shown(cells[1], NUMBER.findall(cells[1]) + NUMBER.findall(cells[2]), VALIDATION_ROWS[label](m, h))


def _off(m: dict, h: dict) -> list[float]:
    row = _ablation_row("classifier off (area-only calls)")
    return [row[k] for k in ("per_patient_dice_mean", "detection_accuracy", "detection_sensitivity",
                             "detection_specificity")]


# The README's Results table, row by row, as VALIDATION_ROWS.
README_ROWS: dict[str, Callable[[dict, dict], list[float]]] = {
    "per-patient volumetric Dice, mean / median / min": lambda m, h: [
        m["pipeline"]["per_patient_dice"][k] for k in ("mean", "median", "min")],
    "tumour-slice Dice (empty-vs-empty slices excluded)": lambda m, h: [m["pipeline"]["tumour_slice_dice"]],
    "classifier AUC; accuracy at #": lambda m, h: [h["classifier"]["threshold"], m["classifier"]["auc"],
                                                   h["classifier"]["accuracy"]],
    "pipeline slice calls: accuracy / sensitivity / specificity": VALIDATION_ROWS[
        "slice calls: accuracy / sensitivity / specificity"],
    "classifier off (slice calls from the segmenter's area alone): per-patient Dice; slice-call accuracy / sensitivity"
    " / specificity": _off,
    "segmenter alone + post-processing (no classifier gate): per-patient Dice": lambda m, h: [
        _ablation_row("segmenter alone + post-processing (no gate)")["per_patient_dice_mean"]],
    "classifier Grad-CAM pointing score (# slices)": lambda m, h: [
        m["classifier"]["gradcam"]["pointing_slices"], m["classifier"]["gradcam"]["pointing_score"]],
    "pooled Dice (labelled extra: all pixels at once)": lambda m, h: [m["pipeline"]["pooled_dice"]],
}


@pytest.mark.realdata
def test_the_readme_results_table(evaluated) -> None:
    lines = (REPO / "README.md").read_text().split("## Results", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| metric (validation"))
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
    pipe, protocol = m["pipeline"], m["protocol"]
    per_patient = sorted(pipe["per_patient"].values())
    listed = claim(r"Per-patient Dice of the (\d+) validation patients, sorted: ([\d., ]+)\.")
    assert_shown("per-patient list", [listed[0], *listed[1].split(", ")], [len(per_patient), *per_patient])
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
    mean, auc = pipe["per_patient_dice"]["mean"], m["classifier"]["auc"]
    at_half = evaluated["at 0.5"]["classifier"]["accuracy"]
    assert_shown("bfloat16", claim(r"bfloat16 classifiers give AUC [\d.]+ vs ([\d.]+)\."), [auc])
    assert_shown("headline prose", claim(r"The pipeline reaches a per-patient Dice of ([\d.]+) on validation"), [mean])
    c, h = m["classifier"], evaluated["at 0.5"]["classifier"]
    shown = claim(r"\| \*\*\(c\) \(b\) \+ phase 3 \(shipped, bfloat16\)\*\* \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \| "
                  r"([\d.]+) / ([\d.]+) \| ([\d.]+) \| \*\*([\d.]+)\*\* \|")
    assert_shown("classifier (c) row", shown, [auc, at_half, h["recall"], h["specificity"], h["ece"],
                                              c["gradcam"]["pointing_score"]])
    assert_shown("operating threshold", claim(r"At the shipped operating\s+threshold \(([\d.]+), below\) the "
                                              r"classifier's own calls have sensitivity ([\d.]+) and specificity "
                                              r"([\d.]+)\."), [c["threshold"], c["sensitivity"], c["specificity"]])
    assert_shown("progress", claim(r"lifted AUC from\s+[\d.]+ to ([\d.]+) and the Grad-CAM pointing score from "
                                   r"[\d.]+ to ([\d.]+)"), [auc, c["gradcam"]["pointing_score"]])
    assert_shown("recall at 0.5", claim(r"At 0.5 it misses about one tumour slice in eight \(recall ([\d.]+)\)"),
                 [h["recall"]])
    worst, shift = claim(r"one patient \(([\d.]+)\) moves the mean by ([\d.]+)")
    n = len(per_patient)
    assert_shown("one patient", [worst, shift], [per_patient[0], (n * mean - per_patient[0]) / (n - 1) - mean])


def _assert_close(recorded: Any, reproduced: Any, where: str = "pipeline.json") -> None:
    if isinstance(recorded, dict):
        assert set(recorded) == set(reproduced), where
        for k in recorded:
            _assert_close(recorded[k], reproduced[k], f"{where}.{k}")
    elif isinstance(recorded, list):
        assert len(recorded) == len(reproduced), where
        for i, (a, b) in enumerate(zip(recorded, reproduced)):
            _assert_close(a, b, f"{where}[{i}]")
    elif isinstance(recorded, float) and not isinstance(recorded, bool):
        assert reproduced == pytest.approx(recorded, abs=1e-3), where  # a few pixels' slack across CPUs
    else:
        assert recorded == reproduced, where


@pytest.mark.realdata
@pytest.mark.slow  # both TTA settings over the 16 validation volumes, then the whole grid
def test_tune_reproduces_the_recorded_operating_point_and_ablation(pipeline, lgg_root: Path) -> None:
    from flaxtumor.operating_point import jsonable
    from flaxtumor.tune import choose, raw_outputs

    recorded = json.loads((CHECKPOINTS / "pipeline.json").read_text())
    val = pipeline.metadata["segmenter"]["split"]["val"]
    with optimised_jax():
        raws = raw_outputs(Pipeline.from_checkpoints(CHECKPOINTS), select(discover(lgg_root), val))  # fresh jit
    reproduced = json.loads(json.dumps(jsonable(choose(raws, pipeline.point.mask_threshold, val))))
    _assert_close(recorded, reproduced)
