"""Suspicious flags apart from the gate: a gate tuned for Dice (0.05) only empties masks where the classifier is sure;
slices with nothing outlined are called suspicious at the classifier's own threshold, and one code path
(`OperatingPoint.flags`) says which, for the pipeline, evaluate and the app."""

import json
import math

import numpy as np
import pytest

from flaxtumor.operating_point import (
    NO_TUMOUR, SUSPICIOUS, TUMOUR, OperatingPoint, flag_at_classifier_threshold, read_operating_point, verdicts,
    write_operating_point,
)

PROBS = np.float32([0.02, 0.2, 0.6, 0.9])


def test_unset_the_flags_follow_the_gate_threshold():
    point = OperatingPoint(threshold=0.05)
    assert point.effective_flag_threshold == 0.05
    assert point.flags(PROBS).tolist() == [False, True, True, True]


def test_a_flag_threshold_of_its_own_moves_the_flags_and_not_the_gate():
    from flaxtumor.operating_point import gate_and_postprocess

    point = OperatingPoint(threshold=0.05, flag_threshold=0.5)
    assert point.flags(PROBS).tolist() == [False, False, True, True]
    masks = np.ones((4, 2, 2), bool)
    calls, final = gate_and_postprocess(PROBS, masks, point)
    assert calls.tolist() == [False, True, True, True]  # the gate still keeps masks from 0.05 up
    assert final.any(axis=(1, 2)).tolist() == [False, True, True, True]


def test_verdicts_flag_at_the_flag_threshold():
    point = OperatingPoint(threshold=0.05, flag_threshold=0.5)
    empty, drawn = np.zeros((2, 2), bool), np.ones((2, 2), bool)
    got = verdicts(point.flags(PROBS), [empty, empty, empty, drawn])
    assert got == [NO_TUMOUR, NO_TUMOUR, SUSPICIOUS, TUMOUR]  # 0.2 clears the gate but is no longer "suspicious"


def test_the_classifier_off_flags_nothing_whatever_the_flag_threshold():
    point = OperatingPoint(threshold=math.inf, flag_threshold=0.5)
    assert not point.flags(PROBS).any()
    assert point.flag_label == "classifier off"


def test_the_file_omits_an_unset_flag_threshold_and_round_trips_a_set_one(tmp_path):
    assert "flag_threshold" not in OperatingPoint(threshold=0.3).to_dict()  # files as every earlier version wrote
    point = OperatingPoint(threshold=0.05, flag_threshold=0.5)
    write_operating_point(tmp_path / "pipeline.json", point)
    assert json.loads((tmp_path / "pipeline.json").read_text())["flag_threshold"] == 0.5
    assert read_operating_point(tmp_path)[0] == point


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.5", True])
def test_a_bad_flag_threshold_is_an_error_naming_it(bad):
    with pytest.raises(ValueError, match="flag_threshold"):
        OperatingPoint(flag_threshold=bad)


def test_tuned_gates_flag_at_the_classifier_threshold():
    assert flag_at_classifier_threshold(OperatingPoint(threshold=0.05), 0.5).flag_threshold == 0.5
    assert flag_at_classifier_threshold(OperatingPoint(threshold=0.5), 0.5).flag_threshold is None  # they agree
    off = OperatingPoint(threshold=math.inf)
    assert flag_at_classifier_threshold(off, 0.5) == off  # off flags nothing; nothing to set
    stale = OperatingPoint(threshold=0.5, flag_threshold=0.3)
    assert flag_at_classifier_threshold(stale, 0.5).flag_threshold is None


def test_the_app_slider_moves_the_gate_and_keeps_the_flags():
    from flaxtumor.app.model_card import threshold_info

    assert "0.50" in threshold_info(0.0, True, True, 0.5) and "suspicious" in threshold_info(0.0, True, True, 0.5)
    assert "suspicious" not in threshold_info(0.0, True, True, None)


def test_the_patient_summary_lists_suspicious_slices_at_the_flag_threshold_and_says_where():
    from flaxtumor.app.cache import Volume
    from flaxtumor.app.report import patient_report, summary_markdown

    volume = Volume("P1", ("a", "b", "c", "d"), (2, 2), tuple(float(p) for p in PROBS))
    final = np.zeros((4, 2, 2), bool)
    final[3] = True
    brain = np.ones((4, 2, 2), bool)
    point = OperatingPoint(threshold=0.05, flag_threshold=0.5)
    report = patient_report(volume, 0, PROBS, final, brain, None, point)
    assert [r["verdict"] for r in report.rows] == [NO_TUMOUR, NO_TUMOUR, SUSPICIOUS, TUMOUR]
    assert [r["classifier_call"] for r in report.rows] == [0, 0, 1, 1]
    text = summary_markdown([report], point, None, None)
    assert "suspicious at P(tumour) ≥ 0.50" in text and "threshold 0.05" in text
    assert "suspicious at" not in summary_markdown([report], OperatingPoint(threshold=0.05), None, None)
