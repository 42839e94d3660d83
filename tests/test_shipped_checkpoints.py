"""The bundled checkpoints load with today's code, no patient a number is claimed on was seen in training, and every
number of checkpoints/MODEL_CARD.md is what the shipped files give: the card's numbers are parsed from the card itself
and compared with values recomputed from the checkpoints, pipeline.json, crossval.json (the cross-validation's
out-of-fold scores, recomputed from its per-patient values) and, where present, the real validation patients.

A card row or sentence this module does not recognise fails (`_row_values`, `claim`), so the card cannot grow a number
that nothing checks. A number is "shown right" when the recomputed value rounds to it at the decimals the card prints.
"""

from __future__ import annotations

import contextlib
import json
import math
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
from flaxtumor import metrics as M
from flaxtumor.operating_point import SAFE_POSTPROCESS_RULES, choice_key
from flaxtumor.checkpoints import load_inference
from tests.data.test_real_data import shared_manifest

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO / "checkpoints"
CARD = CHECKPOINTS / "MODEL_CARD.md"
CROSSVAL = CHECKPOINTS / "crossval.json"  # two seeds averaged, as the segmenter ships
SEEDS = [REPO / "reports" / f"crossval_seed{k}.json" for k in (0, 1)]  # the same folds, one model each, per seed
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


@pytest.fixture(scope="module")
def crossval() -> dict[str, Any]:
    return json.loads(CROSSVAL.read_text())


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


# -- the cross-validation (crossval.json) -------------------------------------------------------------------------


def _recomputed(block: dict[str, Any]) -> dict[str, float]:
    """mean, median and worst per-patient Dice and their bootstrap intervals, from `block`'s per-patient values
    (as crossval.score_seg computes them: percentile bootstrap over patients, seed 0)."""
    scored = [v for v in block["per_patient_dice"].values() if not math.isnan(v)]
    return {"mean": float(np.mean(scored)), "median": float(np.median(scored)), "worst": float(np.min(scored)),
            "mean_ci95": M.bootstrap_interval(scored, np.mean, seed=0),
            "median_ci95": M.bootstrap_interval(scored, np.median, seed=0)}


def _one_model(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """What one model of the recipe scores on average: two single-seed cross-validations' Dice, patient by patient."""
    return {pid: (a[pid] + b[pid]) / 2 for pid in a}


def _fold(per_patient: dict[str, float], crossval: dict[str, Any], fold: int) -> dict[str, float]:
    """The patients `fold` held out."""
    return {pid: per_patient[pid] for pid, k in crossval["fold_of"].items() if k == fold}


def test_crossval_json_agrees_with_its_own_per_patient_values(crossval) -> None:
    for block in (crossval, crossval["postprocessing"]):
        v, again = block["volumetric_dice"], _recomputed(block)
        for k in ("mean", "median", "worst"):
            assert v[k] == pytest.approx(again[k], abs=1e-12), k
        for k in ("mean_ci95", "median_ci95"):
            assert v[k] == pytest.approx(list(again[k]), abs=1e-12), k
        assert sum(block["dice_loss"]["mean"].values()) == pytest.approx(1 - v["mean"], abs=1e-9)


# Each row of the card's cross-validation table → the numbers of a crossval.json block (raw or post-processed).
CV_ROWS: dict[str, Callable[[dict], list[float]]] = {
    "per-patient Dice, mean [95% CI]": lambda b: [b["volumetric_dice"]["mean"], *b["volumetric_dice"]["mean_ci95"]],
    "per-patient Dice, median [95% CI]": lambda b: [b["volumetric_dice"]["median"],
                                                    *b["volumetric_dice"]["median_ci95"]],
    "worst patient": lambda b: [b["volumetric_dice"]["worst"]],
    "tumour-slice Dice [95% CI]": lambda b: [b["tumour_slice_dice"]["value"], *b["tumour_slice_dice"]["ci95"]],
    "Dice lost to false regions / missed slices / outside the outline / inside the outline": lambda b: [
        b["dice_loss"]["mean"][k] for k in ("false_regions", "missed_slices", "outside_outline", "inside_outline")],
}
TARGETS = {"per-patient Dice, mean [95% CI]": 0.86, "per-patient Dice, median [95% CI]": 0.89, "worst patient": 0.50,
           "tumour-slice Dice [95% CI]": 0.80}


def test_the_cross_validation_table_is_crossval_json(crossval) -> None:
    rows = table("| out of fold, 81 patients |")
    assert sorted(r[0] for r in rows) == sorted(CV_ROWS), "a card row without a check, or a check without its row"
    for cells in rows:
        label = cells[0]
        for block, cell in ((crossval, cells[1]), (crossval["postprocessing"], cells[2])):
            assert_shown(f"CV {label}", NUMBER.findall(cell), CV_ROWS[label](block))
        if label in TARGETS:
            assert_shown(f"CV target {label}", NUMBER.findall(cells[3]), [TARGETS[label]])
    chosen = crossval["postprocessing"]["chosen"]
    rule, mask_threshold = claim(r"\| chosen post-processing \(`([\w.]+)`, mask threshold ([\d.]+), no area gate\) \|")
    assert rule == chosen["postprocess"] and float(mask_threshold) == chosen["mask_threshold"]
    assert chosen["min_tumour_area"] == 0 and chosen["gate"] is False
    assert_shown("raw masks' threshold", claim(r"\| raw masks \(two seeds averaged, mask threshold ([\d.]+),"),
                 [crossval["threshold"]])


def test_the_per_fold_table_is_crossval_json(crossval) -> None:
    per_fold = crossval["recommended_epochs"]["per_fold"]
    dice = crossval["postprocessing"]["per_patient_dice"]
    rows = table("| fold | held-out patients |")
    assert [int(r[0]) for r in rows] == [f["fold"] for f in per_fold] == list(range(crossval["folds"]))
    for cells, f in zip(rows, per_fold):
        mine = list(_fold(dice, crossval, f["fold"]).values())
        assert_shown(f"fold {f['fold']}", [NUMBER.findall(c)[0] for c in cells[1:]],
                     [len(mine), f["best_epoch"], f["epochs_trained"], float(np.mean(mine)), float(np.min(mine))])


def test_the_postprocessing_candidates_and_the_choice(crossval) -> None:
    pp = crossval["postprocessing"]
    candidates = pp["candidates"]
    best = max(candidates, key=lambda r: choice_key(r["mean"], r["sensitivity"], r["specificity"], False,
                                                    r["postprocess"], r["min_tumour_area"],
                                                    r["mask_threshold"] != crossval["threshold"]))
    assert best == pp["chosen"]  # the rule tune uses, re-applied to the recorded scores
    rows = table("| mask threshold | area gate | post-processing |")
    assert len(rows) == len(candidates) == int(claim(r"All (\d+) candidates, scored on the out-of-fold")[0])
    for cells, r in zip(rows, candidates):
        assert cells[2] == f"`{r['postprocess']}`"
        assert_shown(f"candidate {r['postprocess']}", [NUMBER.findall(c)[0] for c in (*cells[:2], *cells[3:-1])],
                     [r["mask_threshold"], 100 * r["min_tumour_area"],
                      *(r[k] for k in ("mean", "median", "worst", "sensitivity", "specificity"))])
        assert (cells[-1] == "chosen") == (r == pp["chosen"])
    own = max((r for r in candidates if r["mask_threshold"] == crossval["threshold"]), key=lambda r: r["mean"])
    assert own["postprocess"] == pp["chosen"]["postprocess"]  # "the best candidate at 0.5 is the same rule"
    assert_shown("best at the own threshold", claim(r"The best candidate at ([\d.]+) is the same rule, ([\d.]+) "
                                                    r"against ([\d.]+)\."),
                 [crossval["threshold"], own["mean"], pp["chosen"]["mean"]])


def test_the_lever_table_is_crossval_json(crossval) -> None:
    """The cross-validated levers are checked; single-fold screens (one fold's 16 patients) and the comparison with the
    first release (the classifier's 16 validation patients), measured by runs that do not ship, are labelled as such
    and are not."""
    levers = crossval["levers"]
    rows = table("| lever | measured on |")
    # Cross-validations paired patient by patient, recomputed from the committed reports. The fixed-schedule report's
    # 30-epoch side is exactly what ships; its "best epoch" side is the cross-validation shipped before (each fold's
    # best epoch chosen on its held-out patients), scored like the others with probabilities resized, then
    # thresholded. The missing-sequence report predates that: both its sides resized thresholded masks. The resize
    # report's nearest-neighbour side is the shipped cross-validation's probabilities scored the old way.
    from flaxtumor.compare_runs import paired

    report = json.loads((REPO / "reports" / "missing_sequences_crossval.json").read_text())["chosen post-processing"]
    schedule = json.loads((REPO / "reports" / "fixed_schedule_crossval.json").read_text())
    resize = json.loads((REPO / "reports" / "probability_resize_crossval.json").read_text())
    # The recipe's history was measured with one model per fold (seed 0's folds, reports/crossval_seed0.json); the
    # shipped cross-validation averages two seeds per fold and is paired with one model: the two seeds' mean Dice.
    seed_0, seed_1 = (json.loads(path.read_text())["postprocessing"]["per_patient_dice"] for path in SEEDS)
    two_seeds = crossval["postprocessing"]["per_patient_dice"]
    assert sorted(report["baseline"]) == sorted(report["lever"]) == sorted(seed_0) == sorted(two_seeds)
    fixed_15, best_epoch = schedule["fixed_15_per_patient"], schedule["best_epoch_per_patient"]
    nearest = resize["nearest_per_patient"]["fixed_30"]
    assert sorted(fixed_15) == sorted(best_epoch) == sorted(nearest) == sorted(seed_0)
    checked = {"two seeds averaged vs one model per fold": paired(_one_model(seed_0, seed_1), two_seeds),
               "post-processing": levers["postprocessing"], "mask threshold 0.4 vs 0.5": levers["mask_threshold"],
               "flip TTA": levers["flip_tta"],
               "missing sequences, cross-validated": paired(report["baseline"], report["lever"]),
               "fixed schedule, 30 against 15 epochs": paired(fixed_15, seed_0),
               "no selection on held-out patients": paired(best_epoch, fixed_15),
               "probabilities resized, then thresholded": paired(nearest, seed_0)}
    recorded_pairs = {"fixed schedule, 30 against 15 epochs": schedule["paired"]["fixed_30 vs fixed_15"],
                      "no selection on held-out patients": schedule["paired"]["fixed_15 vs best_epoch"],
                      "probabilities resized, then thresholded": resize["paired"]["fixed_30"]}
    for name, recorded in recorded_pairs.items():
        pair = checked[name]
        assert recorded["mean_difference"] == pytest.approx(pair["mean_difference"]), name
        assert (recorded["better"], recorded["worse"]) == (pair["better"], pair["worse"]), name
    seen = set()
    for cells in rows:
        name = next((k for k in checked if cells[0].startswith(k)), None)
        if name is None:
            assert re.match(r"fold \d screen|the classifier's 16 validation patients", cells[1]), \
                f"lever row {cells[0]!r}: neither cross-validated nor a labelled screen"
            continue
        seen.add(name)
        lever = checked[name]
        assert cells[1] == f"cross-validation, {lever['n_patients']} patients, out of fold"
        assert_shown(f"lever {name}", NUMBER.findall(cells[2]) + NUMBER.findall(cells[3]),
                     [abs(lever["mean_difference"]), *map(abs, lever["mean_difference_ci95"]), lever["better"],
                      lever["worse"]])
        values = [lever["mean_difference"], *lever["mean_difference_ci95"]]
        assert re.findall(r"[+−](?=\d)", cells[2]) == ["+" if v >= 0 else "−" for v in values], cells[2]
    assert seen == set(checked)


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


def test_the_missing_sequence_claims(crossval) -> None:
    groups = crossval["by_sequences"]
    shown = claim(r"the (\d+) FLAIR-only patients average ([\d.]+) \(median ([\d.]+)\), the (\d+) without "
                  r"post-contrast ([\d.]+) and the (\d+) complete ones ([\d.]+)")
    flair, post, complete = groups["FLAIR only"], groups["no post-contrast"], groups["complete"]
    assert_shown("by sequences", shown, [flair["n_scored"], flair["mean"], flair["median"], post["n_scored"],
                                         post["mean"], complete["n_scored"], complete["mean"]])
    assert set(groups) == {"rule", "FLAIR only", "no post-contrast", "complete"}
    assert sum(g["n_scored"] for k, g in groups.items() if k != "rule") == crossval["n_patients"]
    value, patient = claim(r"the worst FLAIR-only patient scores ([\d.]+)\s+\((TCGA_\w+)\)")
    dice = crossval["postprocessing"]["per_patient_dice"]
    assert patient == min(flair["patients"], key=dice.get)
    assert_shown("worst FLAIR-only", [value], [dice[patient]])


def test_the_two_seed_claims(crossval) -> None:
    """Two seeds averaged against one model per fold, and the mask threshold the cross-validation chose: the card's
    numbers follow from the per-patient values of crossval.json, reports/crossval_seed0.json, crossval_seed1.json and
    reports/seed_ensemble_crossval.json (the chosen point at mask thresholds 0.5 and 0.4)."""
    from flaxtumor.compare_runs import paired

    seeds = [json.loads(path.read_text()) for path in SEEDS]
    report = json.loads((REPO / "reports" / "seed_ensemble_crossval.json").read_text())
    assert seeds[0]["fold_of"] == seeds[1]["fold_of"] == crossval["fold_of"]  # the same folds
    for k, one in enumerate(seeds):
        v, s = one["postprocessing"]["volumetric_dice"], one["postprocessing"]["tumour_slice_dice"]
        shown = claim(rf"seed {k} \(`reports/crossval_seed{k}.json`[^)]*\),? (?:scores )?([\d.]+) \[([\d.]+), ([\d.]+)\] at its "
                      r"own(?: chosen point)? \(`([\w.]+)`, mask threshold ([\d.]+)\), median ([\d.]+), worst ([\d.]+), "
                      r"tumour-slice Dice ([\d.]+)")
        assert shown.pop(3) == one["postprocessing"]["chosen"]["postprocess"]
        # (seed 0's report predates the mask-threshold candidates: its masks are at the segmenter's own threshold)
        mask_threshold = one["postprocessing"]["chosen"].get("mask_threshold", one["threshold"])
        assert_shown(f"seed {k}", shown, [v["mean"], *v["mean_ci95"], mask_threshold, v["median"], v["worst"],
                                         s["value"]])
    raw_0, raw_1 = (one["per_patient_dice"] for one in seeds)
    chosen_0, chosen_1 = (one["postprocessing"]["per_patient_dice"] for one in seeds)
    noise = paired(chosen_0, chosen_1)
    assert_shown("seed noise", claim(r"\*\*The seed alone moves a whole cross-validation of this recipe by ([\d.]+)\*\* "
                                     r"\[\+([\d.]+), \+([\d.]+)\] \((\d+) patients better, (\d+) worse\)"),
                 [noise["mean_difference"], *noise["mean_difference_ci95"], noise["better"], noise["worse"]])
    two, two_raw = crossval["postprocessing"]["per_patient_dice"], crossval["per_patient_dice"]
    one = _one_model(chosen_0, chosen_1)
    gain = paired(one, two)
    folds = [paired(_fold(one, crossval, k), _fold(two, crossval, k))["mean_difference"]
             for k in range(crossval["folds"])]
    vs = [paired(chosen_0, two), paired(chosen_1, two)]
    raw = paired(_one_model(raw_0, raw_1), two_raw)
    shown = claim(r"Averaged, the two score \+([\d.]+) \[\+([\d.]+), \+([\d.]+)\] over one model .*?, (\d+) patients "
                  r"better and (\d+) worse, and every fold gains \(([+\d., ]+)\); \+([\d.]+) over seed 0 alone and "
                  r"\+([\d.]+) \[([−+\d.]+), \+([\d.]+)\] over seed 1 alone\. On the raw masks \(mask threshold 0\.5 "
                  r"everywhere\) the gain is \+([\d.]+) \[([−+\d.]+), \+([\d.]+)\] though (\d+) patients are better "
                  r"and (\d+) worse")
    assert min(folds) > 0 and shown[5].count("+") == len(folds)
    assert_shown("two seeds vs one", [x.replace("−", "-") for x in shown[:5] + shown[5].replace("+", "").split(", ")
                                      + shown[6:]],
                 [gain["mean_difference"], *gain["mean_difference_ci95"], gain["better"], gain["worse"], *folds,
                  vs[0]["mean_difference"], vs[1]["mean_difference"], *vs[1]["mean_difference_ci95"],
                  raw["mean_difference"], *raw["mean_difference_ci95"], raw["better"], raw["worse"]])
    recorded = report["two seeds vs one"]["one model"]["each at its chosen point"]["overall"]
    assert recorded["mean_difference"] == pytest.approx(gain["mean_difference"])
    # The mask threshold: the report's 0.4 side is the shipped point, its 0.5 side the same point at 0.5.
    mt = report["mask threshold"]
    at5, at4 = mt["per_patient_dice"]["0.5"], mt["per_patient_dice"]["0.4"]
    assert at4 == crossval["postprocessing"]["per_patient_dice"]
    lever = paired(at5, at4)
    assert lever["mean_difference"] == pytest.approx(crossval["levers"]["mask_threshold"]["mean_difference"])
    (unseen,) = set(range(crossval["folds"])) - set(mt["preview_folds"])
    fold = paired(_fold(at5, crossval, unseen), _fold(at4, crossval, unseen))
    worst = "TCGA_FG_A60K_20040224"
    rest = paired(*({k: d[k] for k in d if k != worst} for d in (at5, at4)))
    shown = claim(r"on fold (\d), which that check had not seen, it scores \+([\d.]+) over 0\.5 at the chosen "
                  r"post-processing \((\d+) patients better, (\d+) worse\), and over all (\d+) \+([\d.]+) \[\+([\d.]+), "
                  r"\+([\d.]+)\] \((\d+) better, (\d+) worse\), \+([\d.]+) \[\+([\d.]+), \+([\d.]+)\] without A60K")
    assert_shown("mask threshold", shown, [unseen, fold["mean_difference"], fold["better"], fold["worse"], len(at4),
                                           lever["mean_difference"], *lever["mean_difference_ci95"], lever["better"],
                                           lever["worse"], rest["mean_difference"], *rest["mean_difference_ci95"]])
    assert_shown("A60K at 0.5", claim(r"A60K is a knife-edge patient: ([\d.]+) at mask threshold 0\.5"), [at5[worst]])


def test_the_headline_prose(pipeline, crossval) -> None:
    """The headline's sentences outside its tables: where this stands, the patient counts, the two worst patients and
    the gate decision."""
    pp = crossval["postprocessing"]
    v, dice, loss = pp["volumetric_dice"], pp["per_patient_dice"], pp["dice_loss"]["per_patient"]
    shown = claim(r"The shipped segmenter's cross-validated per-patient Dice is \*\*([\d.]+) \[([\d.]+), ([\d.]+)\]\*\* "
                  r"\(median ([\d.]+), worst ([\d.]+); tumour-slice Dice ([\d.]+)\), two seeds averaged as shipped")
    assert_shown("where this stands", shown, [v["mean"], *v["mean_ci95"], v["median"], v["worst"],
                                              pp["tumour_slice_dice"]["value"]])
    seeds = [json.loads(path.read_text())["postprocessing"]["volumetric_dice"] for path in SEEDS]
    assert_shown("one model", claim(r"One model per fold scores ([\d.]+) \[([\d.]+), ([\d.]+)\] with seed 0 and ([\d.]+) "
                                    r"\[([\d.]+), ([\d.]+)\] with seed 1\."),
                 [x for v in seeds for x in (v["mean"], *v["mean_ci95"])])
    assert_shown("counts", claim(r"(\d+) of the (\d+) patients score at least 0\.80 and (\d+) below 0\.60"),
                 [sum(d >= 0.80 for d in dice.values()), len(dice), sum(d < 0.60 for d in dice.values())])
    first, second = sorted(dice, key=dice.get)[:2]
    shown = claim(r"The two worst: (TCGA_\w+) \(([\d.]+)\) loses ([\d.]+) of its Dice to masks on its tumour-free "
                  r"slices, and (TCGA_\w+) \(([\d.]+)\), stored FLAIR only, loses it to its small tumour left undrawn "
                  r"\(([\d.]+) in missed slices, ([\d.]+) inside the outline\)")
    assert (shown[0], shown[3]) == (first, second)
    assert_shown("two worst", shown[1:3] + shown[4:], [dice[first], loss[first]["false_regions"], dice[second],
                                                       loss[second]["missed_slices"], loss[second]["inside_outline"]])
    gate = pipeline.record["classifier_gate"]
    off, on = gate["candidates"][0], gate["chosen"]
    second_best = next(c for c in gate["candidates"] if c["threshold"] is not None and c["threshold"] > on["threshold"])
    shown = claim(r"\*\*The classifier gates at threshold ([\d.]+)\*\*, by a hair: per-patient Dice ([\d.]+) against "
                  r"([\d.]+) with the classifier off .*? verdict specificity ([\d.]+) against ([\d.]+) .*? every higher "
                  r"threshold scores lower \(([\d.]+) at ([\d.]+)\)")
    assert_shown("gate", shown, [on["threshold"], on["per_patient_dice_mean"], off["per_patient_dice_mean"],
                                 on["verdict_specificity"], off["verdict_specificity"],
                                 second_best["per_patient_dice_mean"], second_best["threshold"]])
    assert_shown("gate gain", claim(r"As a gate it buys the pipeline\s+almost nothing \(\+([\d.]+) on its"),
                 [on["per_patient_dice_mean"] - off["per_patient_dice_mean"]])
