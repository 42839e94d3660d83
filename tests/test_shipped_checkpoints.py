"""The bundled checkpoints load with today's code, and on the real validation patients (when present) `evaluate`
reproduces the model card's numbers."""

import json
from pathlib import Path

import numpy as np
import pytest

from flaxtumor.data.io import read_image
from flaxtumor.data.synthetic import write_synthetic_dataset
from flaxtumor.inference import Pipeline

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.from_checkpoints(CHECKPOINTS)


def test_bundled_checkpoints_fit_the_budget_and_record_their_provenance(pipeline):
    size = sum(f.stat().st_size for f in CHECKPOINTS.rglob("*") if f.is_file())
    assert size <= 64 * 2**20
    for name in ("classifier", "segmenter"):
        meta = pipeline.metadata[name]
        assert meta["backbone_init"] == "none"  # no ImageNet weights here: the card says "from scratch"
        assert set(meta["split"]["val"]).isdisjoint(meta["split"]["train"])
    assert pipeline.metadata["classifier"]["dtype"] == "bfloat16"
    assert pipeline.record["tuned_on"]["patients"] == pipeline.metadata["segmenter"]["split"]["val"]


def test_bundled_pipeline_predicts_a_synthetic_volume(pipeline, tmp_path):
    root = write_synthetic_dataset(tmp_path, n_patients=1, n_slices=8, size=200, seed=5)
    folder = next(p for p in root.iterdir() if p.is_dir())
    images = [read_image(folder / f"{folder.name}_{i}.tif") for i in range(1, 9)]
    preds = pipeline.predict_volume(images)
    assert len(preds) == 8
    for p in preds:
        assert p.mask.shape == (200, 200) and p.mask.dtype == bool and 0.0 <= p.tumour_probability <= 1.0


def test_evaluate_reproduces_the_model_card(pipeline, lgg_root, tmp_path):
    from flaxtumor.evaluate import main

    assert main(["--data", str(lgg_root), "--checkpoints", str(CHECKPOINTS), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["protocol"]["patients"] == pipeline.metadata["segmenter"]["split"]["val"]
    # The numbers in checkpoints/MODEL_CARD.md
    assert result["pipeline"]["per_patient_dice"]["mean"] == pytest.approx(0.844, abs=0.002)
    assert result["pipeline"]["per_patient_dice"]["median"] == pytest.approx(0.866, abs=0.002)
    assert result["pipeline"]["tumour_slice_dice"] == pytest.approx(0.761, abs=0.002)
    assert result["classifier"]["auc"] == pytest.approx(0.906, abs=0.002)
    assert np.isclose(result["protocol"]["threshold"], 0.05)
