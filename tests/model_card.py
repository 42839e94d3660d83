"""Reading checkpoints/MODEL_CARD.md for the tests that check it (`test_shipped_checkpoints`, `test_shipped_crossval`):
the card as paragraphs, a sentence's numbers (`claim`), a table's rows (`table`), and "shown right" (`assert_shown`: the
recomputed value rounds to the number at the decimals the card prints); the shipped files' paths, their fixtures, and
what the cross-validation table's rows are computed from (`CV_ROWS`)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flaxtumor import metrics as M
from flaxtumor.inference import Pipeline

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



@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.from_checkpoints(CHECKPOINTS)


@pytest.fixture(scope="module")
def crossval() -> dict[str, Any]:
    return json.loads(CROSSVAL.read_text())


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
