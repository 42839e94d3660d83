"""The cross-validation numbers of checkpoints/MODEL_CARD.md are what crossval.json and the reports give: the headline
and per-fold tables, the post-processing candidates and the choice, the lever table, the missing-sequence and two-seed
claims, and the headline prose, each recomputed from the files' per-patient values (`tests.model_card` reads the card).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from flaxtumor.operating_point import choice_key
from tests.model_card import (  # noqa: F401 (fixtures)
    CV_ROWS, NUMBER, REPO, SEEDS, TARGETS, _fold, _one_model, _recomputed, assert_shown, claim,
    crossval, pipeline, table,
)


def test_crossval_json_agrees_with_its_own_per_patient_values(crossval) -> None:
    for block in (crossval, crossval["postprocessing"]):
        v, again = block["volumetric_dice"], _recomputed(block)
        for k in ("mean", "median", "worst"):
            assert v[k] == pytest.approx(again[k], abs=1e-12), k
        for k in ("mean_ci95", "median_ci95"):
            assert v[k] == pytest.approx(list(again[k]), abs=1e-12), k
        assert sum(block["dice_loss"]["mean"].values()) == pytest.approx(1 - v["mean"], abs=1e-9)





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
            assert re.match(r"folds? \d(–\d)? screen|the classifier's 16 validation patients", cells[1]), \
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
