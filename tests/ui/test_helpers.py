"""The UI's pure helpers: brain area, tumour percentage, model card, output dirs, example folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flaxtumor.ui import RequestDirs, brain_mask, find_examples, model_card_markdown, threshold_info, tumour_area
from tests.ui import files as F


def test_brain_area_fills_dark_holes_and_bounds_the_percentage() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[8:56, 8:56] = 120
    image[28:36, 28:36] = 0  # a dark ventricle inside the head still counts as brain
    brain = brain_mask(image)
    assert brain.sum() == 48 * 48
    tumour = np.zeros((64, 64), bool)
    tumour[8:20, 8:20] = True
    assert tumour_area(tumour, brain) == (144, 100.0 * 144 / (48 * 48))
    everywhere = np.ones((64, 64), bool)
    assert tumour_area(everywhere, brain)[1] == 100.0
    assert tumour_area(tumour, np.zeros_like(tumour))[1] == 100.0
    assert tumour_area(np.zeros_like(tumour), np.zeros_like(tumour)) == (0, None)


def test_model_card_names_the_protocol_and_metrics() -> None:
    summary = {
        "models": {"segmenter": {"task": "seg", "preprocessing": {"image_size": 128, "normalisation": "volume_zscore"},
                                 "backbone_init": "none", "dtype": "float32", "threshold": 0.5,
                                 "split_sizes": {"train": 55, "val": 14}, "metrics": {"volumetric_dice": 0.81}}},
        "pipeline": {"threshold": 0.5, "gate": True},
    }
    text = model_card_markdown(summary)
    assert "patient-level split" in text and "| patients per split | train 55, val 14 |" in text
    assert "| backbone init | none |" in text
    assert "| volumetric_dice | 0.810 | 3D Dice per patient, mean over patients |" in text
    assert "no `pipeline.json`" in text


def _shipped_like_summary(test_patients: int) -> dict:
    record = {
        "threshold": 0.05, "min_tumour_area": 0.0005, "lcc": True, "gate": True, "tta": False, "mask_threshold": 0.5,
        "tuned_on": {"patients": [f"P{i}" for i in range(16)], "split": "val patients",
                     "grid": {"threshold": [0.05 * k for k in range(1, 20)], "lcc": [False, True]},
                     "note": "optimistic"},
        "validation": {"per_patient_dice_mean": 0.8442615, "detection_sensitivity": 0.9655},
        "ablation": [{"name": "segmenter alone", "threshold": 0.5, "min_tumour_area": 0.0, "lcc": False, "gate": False,
                      "per_patient_dice_mean": 0.84013},
                     {"name": "classifier off", "threshold": None, "min_tumour_area": 0.0005, "lcc": True,
                      "gate": True, "per_patient_dice_mean": 0.8442}],
        "provenance": {"command": "python -m flaxtumor.tune", "commit": "abc123"},
    }
    models = {"classifier": {"task": "cls", "preprocessing": {"image_size": 128, "normalisation": "image_zscore"},
                             "split_sizes": {"train": 65, "val": 16, "test": test_patients},
                             "metrics": {"auc": 0.905, "by_size": {"small": 0.5}}, "source": "/srv/x/checkpoints/classifier"}}
    point = {"threshold": 0.05, "min_tumour_area": 0.0005, "mask_threshold": 0.5, "postprocess": "largest_component",
             "tta": False, "gate": True}
    return {"models": models, "pipeline": point, "operating_point": record}


def test_model_card_is_markdown_tables_with_exact_settings() -> None:
    text = model_card_markdown(_shipped_like_summary(test_patients=0))
    assert "| `min_tumour_area` | 0.0005 |" in text and "0.001 " not in text  # exact, not rounded to 3 decimals
    assert "| `postprocess` | largest_component |" in text and "| `gate` | on |" in text
    assert "{" not in text and "[" not in text  # no printed Python dict or list
    assert "| per_patient_dice_mean | 0.844 |" in text and "on the 16 patients it was tuned on" in text
    assert "| classifier off | ∞ (classifier off) | 0.0005 | on | on | 0.844 |" in text  # the ablation, row by row
    assert "| segmenter alone | 0.5 | 0.0 | off | off | 0.840 |" in text
    assert "| grid / threshold | 0.05, 0.1, 0.15000000000000002, …, 0.9500000000000001 (19 in all) |" in text
    assert "| provenance / commit | abc123 |" in text and "| by_size / small | 0.500 |" in text
    assert "| loaded from | checkpoints/classifier |" in text and "/srv" not in text  # no server path
    assert "untouched" not in text and "no test patients" in text


def test_model_card_mentions_the_test_split_only_when_there_is_one() -> None:
    assert "the untouched test split is reported by" in model_card_markdown(_shipped_like_summary(test_patients=12))


def test_request_dirs_are_removed_after_the_grace_period() -> None:
    dirs = RequestDirs(grace_s=3600)
    first = dirs.new()
    (first / "mask.png").write_bytes(b"x")
    dirs.finish(first)
    dirs.sweep()
    assert first.exists()  # still within the grace period
    dirs.sweep(grace_s=0)
    assert not first.exists()
    dirs.close()
    assert not dirs.root.exists()


def test_examples_folder(tmp_path: Path) -> None:
    F.good_png(tmp_path, "b_2.png")
    F.good_png(tmp_path, "b_10.png")
    F.good_png(tmp_path, "b_2_mask.png")
    F.zip_of(tmp_path / "patient.zip", {"p/1.png": F.png_bytes(F.slice_array())})
    (tmp_path / "notes.txt").write_text("ignored")
    examples = find_examples(tmp_path)
    assert list(examples.slices) == ["b_2.png", "b_10.png"]
    assert [p.name for p in examples.patients] == ["patient.zip"]


def test_threshold_help_mentions_the_fused_gate_only_when_it_is_on() -> None:
    assert "fused gate" not in threshold_info(0.0)
    assert "0.05%" in threshold_info(0.0005) and "fused gate" in threshold_info(0.0005)


def test_model_card_shows_a_cross_validated_point_and_its_gate_decision_as_tables() -> None:
    record = {  # as crossval writes pipeline.json, then classifier_gate adds its decision
        "threshold": None, "min_tumour_area": 0.001, "postprocess": "drop_small_0.004", "gate": True, "tta": False,
        "mask_threshold": 0.5,
        "tuned_on": {"patients": [f"P{i}" for i in range(81)], "split": "out-of-fold predictions",
                     "candidates": [{"min_tumour_area": 0.0, "gate": False, "postprocess": "none"},
                                    {"min_tumour_area": 0.001, "gate": True, "postprocess": "drop_small_0.004"}],
                     "scores": {"volumetric_dice": {"mean": 0.8146, "mean_ci95": [0.7749, 0.8484]}}},
        "validation": {"per_patient_dice_mean": 0.8146},
        "classifier_gate": {
            "patients": [f"P{i}" for i in range(16)], "protocol": "the classifier's validation patients",
            "candidates": [{"threshold": None, "min_tumour_area": 0.001, "gate": True, "per_patient_dice_mean": 0.81},
                           {"threshold": 0.3, "min_tumour_area": 0.0, "gate": True, "per_patient_dice_mean": 0.80}],
            "chosen": {"threshold": None, "min_tumour_area": 0.001, "gate": True, "per_patient_dice_mean": 0.81}},
    }
    point = {"threshold": float("inf"), "min_tumour_area": 0.001, "mask_threshold": 0.5,
             "postprocess": "drop_small_0.004", "tta": False, "gate": True}
    text = model_card_markdown({"models": {}, "pipeline": point, "operating_point": record})
    assert "{" not in text and "[" not in text  # no printed Python dict or list
    assert "**The 2 candidates searched**" in text and "|  | 0.001 | on | drop_small_0.004 |" in text
    assert "| scores / volumetric_dice / mean_ci95 | 0.7749, 0.8484 |" in text
    assert "**The classifier gate**" in text and "| protocol | the classifier's validation patients |" in text
    assert "| chosen | ∞ (classifier off) | 0.001 | on | 0.810 |" in text  # the chosen row is named
    assert "|  | 0.3 | 0.0 | on | 0.800 |" in text
    assert "Other records" not in text  # every record has its section
