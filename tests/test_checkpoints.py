"""flaxtumor.checkpoints: typed inference metadata, the shipped checkpoints' old keys, and serving never importing
the training package."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from flaxtumor.checkpoints import InferenceMetadata, load_inference
from flaxtumor.config import Config
from tests.fixtures_checkpoints import tiny  # noqa: F401  (session fixture)

PACKAGE = Path(__file__).resolve().parents[1] / "flaxtumor"
SHIPPED = PACKAGE.parent / "checkpoints"
# Training commands outside train/: they train models, so they may use the training package.
TRAINING_COMMANDS = {"crossval.py": "trains one model per fold (python -m flaxtumor.crossval)"}


def _imports_train(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == "flaxtumor.train" or a.name.startswith("flaxtumor.train.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "flaxtumor.train" or node.module.startswith("flaxtumor.train."):
                found.append(node.module)
            elif node.module == "flaxtumor" and any(a.name == "train" for a in node.names):
                found.append("flaxtumor.train")
    return found


def test_no_module_outside_train_imports_the_training_package():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "train" or str(rel) in TRAINING_COMMANDS:
            continue
        if found := _imports_train(path):
            offenders[str(rel)] = found
    assert not offenders, f"serving modules import flaxtumor.train: {offenders}"


def test_the_scan_sees_every_import_form(tmp_path):
    for line in ("import flaxtumor.train.loop", "from flaxtumor.train import cli", "from flaxtumor import train",
                 "def f():\n    from flaxtumor.train.checkpoint import TrainCheckpoints"):
        (tmp_path / "m.py").write_text(line + "\n")
        assert _imports_train(tmp_path / "m.py"), line
    (tmp_path / "m.py").write_text("from flaxtumor.checkpoints import load_inference\nimport flaxtumor.training_notes\n")
    assert not _imports_train(tmp_path / "m.py")


def test_metadata_is_typed_and_round_trips(tiny):  # noqa: F811
    _, meta = load_inference(tiny.checkpoints / "segmenter")
    assert isinstance(meta, InferenceMetadata) and isinstance(meta.config, Config)
    assert meta.task == "seg" and meta.threshold == 0.0 and meta.preprocessing.normalisation == "volume_zscore"
    raw = json.loads((tiny.checkpoints / "segmenter" / "metadata.json").read_text())
    assert json.loads(json.dumps(meta.to_dict())) == raw  # unknown keys (history, versions) kept in `extra`
    assert meta["split"]["val"] == list(tiny.val) and meta.get("nope", 3) == 3  # the read-only JSON view


def test_bad_metadata_is_refused():
    config = Config().to_dict()
    with pytest.raises(TypeError, match="threshold"):
        InferenceMetadata.from_dict({"config": config, "threshold": "high"})
    with pytest.raises(KeyError):
        InferenceMetadata.from_dict({"task": "seg"})


@pytest.mark.skipif(not (SHIPPED / "classifier" / "metadata.json").is_file(), reason="no shipped checkpoints")
def test_shipped_metadata_with_the_old_threshold_key_reads_as_typed_metadata():
    from flaxtumor.checkpoint_metadata import read_metadata
    from flaxtumor.ensemble import member_paths

    members = member_paths(SHIPPED / "segmenter", read_metadata(SHIPPED / "segmenter"))  # [] for a single model
    segmenters = [f"segmenter/{m.name}" for m in members] or ["segmenter"]
    for name, field in (("classifier", "cls_threshold"), *((seg, "mask_threshold") for seg in segmenters)):
        raw = json.loads((SHIPPED / name / "metadata.json").read_text())
        train = raw["config"]["train"]
        if "threshold" not in train:  # the classifier was retrained since: write it the old way, as before the split
            train["threshold"] = train.pop("cls_threshold")
            train.pop("mask_threshold")
        meta = InferenceMetadata.from_dict(raw)
        assert getattr(meta.config.train, field) == raw["config"]["train"]["threshold"]
        assert meta.threshold == raw["threshold"] and meta.extra["history"] == raw["history"]
