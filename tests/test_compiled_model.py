"""The serving cache (flaxtumor.compiled_model): a warm entry gives bit-identical outputs without building the model; a
changed checkpoint gets a new entry; damaged entries are rebuilt; and an entry written in a process whose programs
came from JAX's persistent compilation cache still runs in a new process (the jaxlib 0.10 pitfall), where a warm
run imports neither flax nor Orbax."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxtumor.checkpoints import load_inference
from flaxtumor.compiled_model import CompiledModel, cache_entry
from tests.fixtures_checkpoints import IMAGE_SIZE, tiny  # noqa: F401  (session fixture)

REPO = Path(__file__).resolve().parents[1]


class Loads:
    """A loader that counts how often the model had to be built."""

    def __init__(self, path: Path):
        self.path, self.calls = path, 0

    def __call__(self):
        self.calls += 1
        return load_inference(self.path)[0]


def _batch(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def _compiled(path: Path, root: Path) -> tuple[CompiledModel, Loads]:
    loads = Loads(path)
    return CompiledModel(loads, 4, IMAGE_SIZE, cache_entry(path, root)), loads


def test_a_warm_entry_gives_identical_outputs_without_building_the_model(tiny, tmp_path):  # noqa: F811
    classifier = tiny.checkpoints / "classifier"
    cold, cold_loads = _compiled(classifier, tmp_path)
    assert not cold.prepare(tta=False) and cold_loads.calls == 1
    expected = cold(_batch(), tta=False), cold(_batch(), tta=True), cold.gradcam(_batch(2), stage=-1)

    warm, warm_loads = _compiled(classifier, tmp_path)
    assert warm.prepare(tta=False)
    got = warm(_batch(), tta=False), warm(_batch(), tta=True), warm.gradcam(_batch(2), stage=-1)
    assert warm_loads.calls == 0, "a warm entry must not rebuild the model"
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)
    # ... and both equal the model called directly, as the pipeline did before the cache existed
    model = load_inference(classifier)[0]
    direct = np.asarray(1 / (1 + np.exp(-np.asarray(model(_batch()), np.float64))))
    np.testing.assert_allclose(expected[0], direct, rtol=1e-5, atol=1e-6)


def test_a_changed_checkpoint_gets_a_new_entry(tiny, tmp_path):  # noqa: F811
    copy = tmp_path / "classifier"
    shutil.copytree(tiny.checkpoints / "classifier", copy)
    before = cache_entry(copy, tmp_path / "cache")
    meta = json.loads((copy / "metadata.json").read_text())
    meta["threshold"] = 0.25
    (copy / "metadata.json").write_text(json.dumps(meta))
    assert cache_entry(copy, tmp_path / "cache") != before
    assert cache_entry(copy, None) is None


@pytest.mark.parametrize("damage", ["executable", "weights"])
def test_a_damaged_entry_is_rebuilt(tiny, tmp_path, damage):  # noqa: F811
    segmenter = tiny.checkpoints / "segmenter"
    first, _ = _compiled(segmenter, tmp_path)
    expected = first(_batch(), tta=False)
    entry = cache_entry(segmenter, tmp_path)
    target = next(entry.glob("forward_*.xla")) if damage == "executable" else entry / "weights.npz"
    target.write_bytes(b"garbage")

    again, loads = _compiled(segmenter, tmp_path)
    np.testing.assert_array_equal(again(_batch(), tta=False), expected)
    assert loads.calls == 1
    if damage == "executable":  # rewritten, so the next process is warm again
        warm, warm_loads = _compiled(segmenter, tmp_path)
        np.testing.assert_array_equal(warm(_batch(), tta=False), expected)
        assert warm_loads.calls == 0


def test_without_an_entry_it_compiles_in_memory(tiny):  # noqa: F811
    loads = Loads(tiny.checkpoints / "classifier")
    model = CompiledModel(loads, 4, IMAGE_SIZE, None)
    assert not model.prepare(tta=False) and loads.calls == 1
    assert model(_batch(), tta=False).shape == (5,) and loads.calls == 1


RUN = """
import sys
from flaxtumor.runtime import enable_compilation_cache
enable_compilation_cache()
from flaxtumor.inference import Pipeline
import numpy as np
p = Pipeline.from_checkpoints(sys.argv[1])
x = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
preds = p.predict_volume(list(x))
warm = p._classify._model is None and p._segment._model is None and not {"flax", "orbax.checkpoint"} & set(sys.modules)
print(warm, " ".join(f"{r.tumour_probability:.9g} {r.mask.sum()}" for r in preds))
"""


def _run(checkpoints: Path, cache: Path) -> list[str]:
    done = subprocess.run([sys.executable, "-c", RUN, str(checkpoints)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "FLAXTUMOR_CACHE_DIR": str(cache)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split(maxsplit=1)


def test_an_entry_written_after_a_persistent_cache_hit_runs_in_a_new_process(tiny, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    built, cold = _run(tiny.checkpoints, cache)  # fills JAX's persistent cache and the serving cache
    assert built == "False"
    for entry in (cache / "serving").iterdir():  # the serving entry goes, JAX's cache stays: the next run's
        for f in entry.iterdir():                 # compile would be a persistent-cache hit
            f.unlink()
    _run(tiny.checkpoints, cache)
    restored, warm = _run(tiny.checkpoints, cache)
    assert restored == "True", "a warm run built a model or imported flax/Orbax: the entry did not load and run"
    assert warm == cold


def test_batches_run_on_the_pool_come_back_in_order_and_equal_one_at_a_time(tiny):  # noqa: F811
    segmenter = tiny.checkpoints / "segmenter"
    model = CompiledModel(lambda: load_inference(segmenter)[0], 4, IMAGE_SIZE)
    x = _batch(n=11, seed=3)  # three batches of 4, the last one padded
    together = model(x, tta=False)
    assert together.shape[0] == 11
    for k in range(11):  # each slice alone (its own padded batch) gives the same output, in the same place
        np.testing.assert_array_equal(model(x[k : k + 1], tta=False)[0], together[k])
    assert model(x[:0], tta=False).shape == (0,)
