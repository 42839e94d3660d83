"""`app.py --classifier DIR --segmenter DIR`: a newly trained model paired with a shipped one (each defaults to
--checkpoints' own; the operating point stays --checkpoints' pipeline.json)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flaxtumor.checkpoints import CheckpointError
from flaxtumor.inference import Pipeline
from flaxtumor.ui import main


def _retrained(tiny, tmp_path: Path, threshold: float) -> Path:
    """A copy of the tiny classifier whose metadata records another threshold: a stand-in for a new model."""
    folder = tmp_path / "new" / "classifier"
    shutil.copytree(tiny.checkpoints / "classifier", folder)
    meta = json.loads((folder / "metadata.json").read_text())
    meta["threshold"] = threshold
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def test_a_new_classifier_pairs_with_the_shipped_segmenter(tiny, tmp_path: Path) -> None:
    checkpoints = tmp_path / "shipped"
    shutil.copytree(tiny.checkpoints, checkpoints)
    new = _retrained(tiny, tmp_path, 0.25)
    pipeline = Pipeline.from_checkpoints(checkpoints, classifier=new)
    assert pipeline.metadata["classifier"].threshold == 0.25 and pipeline.point.threshold == 0.25
    assert pipeline.sources == {"classifier": new, "segmenter": checkpoints / "segmenter"}
    assert pipeline.summary()["models"]["classifier"]["source"] == str(new)
    (checkpoints / "pipeline.json").write_text(json.dumps({"threshold": 0.4, "lcc": True}))
    paired = Pipeline.from_checkpoints(checkpoints, classifier=new)
    assert paired.point.threshold == 0.4 and paired.point.postprocess == "largest_component"  # --checkpoints' point
    default = Pipeline.from_checkpoints(checkpoints)
    assert default.metadata["classifier"].threshold == 0.5  # without the flags nothing changes


def test_a_model_given_for_the_wrong_role_is_refused_in_words(tiny) -> None:
    with pytest.raises(CheckpointError, match="a 'seg' checkpoint, but the classifier must be a 'cls' one"):
        Pipeline.from_checkpoints(tiny.checkpoints, classifier=tiny.checkpoints / "segmenter")


def test_app_names_the_flag_of_a_missing_model(tiny, tmp_path: Path, capsys) -> None:
    assert main(["--checkpoints", str(tiny.checkpoints), "--segmenter", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--segmenter {tmp_path / 'nope'}" in err and "no such checkpoint folder" in err
