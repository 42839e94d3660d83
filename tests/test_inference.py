"""Pipeline: gating, input sizes and channels, volumes, LCC, TTA, fixed batch shape, Grad-CAM, metadata."""

import dataclasses
import json
import re

import numpy as np
import pytest

from flaxtumor.data.io import read_image
from flaxtumor.inference import Pipeline, as_rgb, gate_and_postprocess, largest_connected_component
from flaxtumor.operating_point import OperatingPoint
from flaxtumor.checkpoints import CheckpointError
from tests.fixtures_checkpoints import tiny  # noqa: F401  (session fixture)


def _volume(tiny):  # noqa: F811
    folder = tiny.data / tiny.val[0]
    files = sorted((p for p in folder.glob("*.tif") if not p.stem.endswith("_mask")),
                   key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return [read_image(p) for p in files]


def _random_images(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]


def test_gate_empties_slices_below_threshold_and_no_gate_segments_all(tiny):  # noqa: F811
    images = _random_images([(40, 40, 3)] * 3)
    pipeline = Pipeline.from_checkpoints(tiny.checkpoints)
    off = pipeline.point.override(threshold=float("inf"))  # the classifier flags nothing
    gated = pipeline.predict_slices(images, off)
    assert all(not p.has_tumour and not p.mask.any() and p.verdict == "no tumour" for p in gated)
    ungated = pipeline.predict_slices(images, off.override(gate=False))
    # the fixture's segmenter (mask threshold 0) marks every pixel wherever it runs: a drawn mask is "tumour" even
    # where the classifier does not flag the slice
    assert all(p.has_tumour and p.mask.all() and not p.classifier_call and p.verdict == "tumour" for p in ungated)
    passed = pipeline.predict_slices(images, off.override(threshold=0.0))
    assert all(p.has_tumour and p.mask.all() and p.classifier_call for p in passed)
    assert [p.tumour_probability for p in gated] == [p.tumour_probability for p in passed]


def test_threshold_defaults_come_from_the_checkpoints(tiny):  # noqa: F811
    p = Pipeline.from_checkpoints(tiny.checkpoints)
    assert p.point == OperatingPoint(threshold=0.5, mask_threshold=0.0)
    summary = p.summary()
    assert summary["models"]["classifier"]["preprocessing"] == {"image_size": 32, "normalisation": "image_zscore"}
    assert summary["models"]["segmenter"]["split_sizes"] == {"train": 1, "val": 2, "test": 0}
    assert summary["pipeline"]["gate"] is True
    assert p.metadata["segmenter"]["split"]["val"] == list(tiny.val)


def test_masks_come_back_at_any_input_size(tiny):  # noqa: F811
    p = Pipeline.from_checkpoints(tiny.checkpoints, threshold=0.0)
    shapes = [(37, 53, 3), (256, 256, 3), (9, 200, 3), (64, 64)]
    preds = p.predict_slices(_random_images(shapes))
    assert [pr.mask.shape for pr in preds] == [s[:2] for s in shapes]
    assert all(pr.mask.dtype == np.bool_ and 0.0 <= pr.tumour_probability <= 1.0 for pr in preds)


def test_gray_is_replicated_and_alpha_dropped(tiny):  # noqa: F811
    p = Pipeline.from_checkpoints(tiny.checkpoints)
    (rgb,) = _random_images([(48, 48, 3)])
    gray = rgb[..., 1]
    rgba = np.concatenate([rgb, np.full((48, 48, 1), 7, np.uint8)], axis=-1)
    probs = [x.tumour_probability for x in p.predict_slices([gray, gray[..., None], np.repeat(gray[..., None], 3, -1)])]
    assert probs[0] == probs[1] == probs[2]
    assert p.predict_slices([rgba])[0].tumour_probability == p.predict_slices([rgb])[0].tumour_probability
    assert as_rgb(rgba).shape == (48, 48, 3)
    with pytest.raises(ValueError, match="uint8"):
        as_rgb(np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError, match="shape"):
        as_rgb(np.zeros((4, 4, 2), np.uint8))


def test_padding_the_last_batch_changes_nothing_and_compiles_once(tiny):  # noqa: F811
    p = Pipeline.from_checkpoints(tiny.checkpoints, batch_size=4)
    images = _random_images([(32, 32, 3)] * 7)
    together = [x.tumour_probability for x in p.predict_slices(images)]
    alone = [p.predict_slices([im])[0].tumour_probability for im in images]
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert list(p._classify._executables) == ["forward_b4_tta0"]  # batches of 4, 3 (padded) and 1 (padded): one shape


def test_flip_tta_averages_the_image_and_its_mirror(tiny):  # noqa: F811
    plain = Pipeline.from_checkpoints(tiny.checkpoints)
    tta = Pipeline.from_checkpoints(tiny.checkpoints, tta=True)
    (im,) = _random_images([(32, 32, 3)])
    expected = np.mean([x.tumour_probability for x in plain.predict_slices([im, im[:, ::-1]])])
    assert tta.predict_slices([im])[0].tumour_probability == pytest.approx(expected, rel=1e-5)


def test_predict_volume_matches_raw_outputs_gated_and_postprocessed(tiny):  # noqa: F811
    volume = _volume(tiny)
    raw = Pipeline.from_checkpoints(tiny.checkpoints, mask_threshold=0.5)
    probs = raw.tumour_probabilities(volume, volume=True)
    # a threshold inside the range of probabilities, so some slices pass the gate and some do not
    threshold = float(np.sort(probs)[len(probs) // 2])
    p = Pipeline.from_checkpoints(tiny.checkpoints, mask_threshold=0.5, threshold=threshold)
    masks = np.stack(p.segment(volume, volume=True))
    for lcc in (False, True):
        point = p.point.override(lcc=lcc)
        preds = p.predict_volume(volume, point)
        calls, expected = gate_and_postprocess(probs, masks, point)
        np.testing.assert_array_equal(np.stack([x.mask for x in preds]), expected)
        assert [x.classifier_call for x in preds] == list(probs >= threshold) == list(calls)
        assert [x.has_tumour for x in preds] == list(expected.any(axis=(1, 2)))
    ungated = p.predict_volume(volume, p.point.override(gate=False))
    np.testing.assert_array_equal(np.stack([x.mask for x in ungated]), masks)

    # Fused gate: a slice the classifier rejects is still called tumour when its mask is large enough.
    area = np.array([m.mean() for m in masks])
    min_area = float(np.sort(area[area > 0])[0]) if (area > 0).any() else 1.0
    fused = Pipeline.from_checkpoints(tiny.checkpoints, mask_threshold=0.5, threshold=threshold,
                                      min_tumour_area=min_area)
    point = fused.point.override(lcc=False)
    calls, expected = gate_and_postprocess(probs, masks, point)
    np.testing.assert_array_equal(calls, (probs >= threshold) | (area >= min_area))
    preds = fused.predict_volume(volume, point)
    np.testing.assert_array_equal(np.stack([x.mask for x in preds]), expected)
    assert [x.has_tumour for x in preds] == list(expected.any(axis=(1, 2)))


def test_fused_gate_rescues_a_slice_the_classifier_rejects():
    probs = np.array([0.9, 0.1, 0.1])
    masks = np.zeros((3, 10, 10), bool)
    masks[0, :2] = masks[1, :5] = masks[2, :1, :3] = True  # areas 0.2, 0.5, 0.03
    calls, out = gate_and_postprocess(probs, masks, OperatingPoint(threshold=0.5))
    assert list(calls) == [True, False, False] and not out[1:].any()
    calls, out = gate_and_postprocess(probs, masks, OperatingPoint(threshold=0.5, min_tumour_area=0.1))
    assert list(calls) == [True, True, False]
    np.testing.assert_array_equal(out[1], masks[1])
    assert not out[2].any()


def test_volume_normalisation_differs_from_per_slice_fallback(tiny):  # noqa: F811
    # the segmenter is volume_zscore: a slice seen within its volume is normalised with the volume's statistics
    volume = _volume(tiny)
    p = Pipeline.from_checkpoints(tiny.checkpoints, mask_threshold=0.5)
    x_volume = p._prepare(volume, p.segmenter_spec, volume=True)
    x_slices = p._prepare(volume, p.segmenter_spec, volume=False)
    assert not np.allclose(x_volume, x_slices)
    with pytest.raises(ValueError, match="one size"):
        p.predict_volume(_random_images([(32, 32, 3), (40, 40, 3)]))


def test_largest_connected_component_is_3d_with_diagonal_neighbours():
    v = np.zeros((4, 6, 6), bool)
    v[0, 0:2, 0:2] = True  # 4 voxels ...
    v[1, 2, 2] = True  # ... joined diagonally across slices: 5 in all
    v[3, 4:6, 4:6] = True  # 4 voxels, separate
    kept = largest_connected_component(v)
    assert kept.sum() == 5 and kept[1, 2, 2] and not kept[3].any()
    assert not largest_connected_component(np.zeros((2, 3, 3), bool)).any()


def test_gradcam_is_at_input_size_in_unit_range(tiny):  # noqa: F811
    p = Pipeline.from_checkpoints(tiny.checkpoints)
    (im,) = _random_images([(45, 61, 3)])
    heat = p.gradcam(im)
    assert heat.shape == (45, 61) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0


def test_missing_checkpoints_raise_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Pipeline.from_checkpoints(tmp_path / "nowhere")


def test_empty_inputs_give_empty_outputs(tiny):  # noqa: F811
    p = Pipeline.from_checkpoints(tiny.checkpoints)
    assert p.predict_slices([]) == [] and p.predict_volume([]) == []


def test_flip_tta_flips_the_segmenter_output_back(tiny):  # noqa: F811
    p = Pipeline.from_checkpoints(tiny.checkpoints)
    x = p._prepare(_random_images([(32, 32, 3)] * 2), p.segmenter_spec, volume=False)
    expected = (p._segment(x, False) + p._segment(x[:, :, ::-1], False)[:, :, ::-1]) / 2
    np.testing.assert_allclose(p._segment(x, True), expected, rtol=1e-5, atol=1e-6)


def test_operating_point_file_sets_defaults_and_options_win(tiny, tmp_path):  # noqa: F811
    import json
    import shutil

    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(tiny.checkpoints, checkpoints)
    (checkpoints / "pipeline.json").write_text(json.dumps({"threshold": 0.3, "lcc": True, "tta": True,
                                                           "tuned_on": "val patients"}))
    p = Pipeline.from_checkpoints(checkpoints).point
    assert (p.threshold, p.lcc, p.tta, p.gate, p.mask_threshold) == (0.3, True, True, True, 0.0)
    assert Pipeline.from_checkpoints(checkpoints).summary()["operating_point"]["tuned_on"] == "val patients"
    p = Pipeline.from_checkpoints(checkpoints, threshold=0.7, lcc=False, tta=None).point
    assert (p.threshold, p.lcc, p.tta) == (0.7, False, True)  # None keeps the file's setting

    for bad, message in (({"lcc": "yes"}, "'lcc' must be a bool"), ({"threshold": 1.5}, "'threshold' must lie in"),
                         ({"postprocess": "blur"}, "'postprocess' must be one of"),
                         ({"lcc": True, "postprocess": "none"}, "'lcc' (True) contradicts")):
        (checkpoints / "pipeline.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"pipeline.json: " + re.escape(message)):
            Pipeline.from_checkpoints(checkpoints)


def test_operating_point_round_trips_through_pipeline_json(tmp_path):
    from flaxtumor.operating_point import read_operating_point, write_operating_point

    point = OperatingPoint(threshold=0.25, min_tumour_area=0.001, mask_threshold=0.4, postprocess="largest_component",
                           tta=True, gate=False)
    write_operating_point(tmp_path / "pipeline.json", point, tuned_on={"patients": ["a"]}, ablation=[])
    read, record = read_operating_point(tmp_path)
    assert read == point and record["tuned_on"] == {"patients": ["a"]}
    assert json.loads((tmp_path / "pipeline.json").read_text())["lcc"] is True  # the format older versions read
    with pytest.raises(ValueError, match="repeats"):
        write_operating_point(tmp_path / "x.json", point, threshold=0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        point.threshold = 0.9  # type: ignore[misc]
    assert read_operating_point(tmp_path / "nowhere", point) == (point, {})


def test_predict_never_changes_the_pipeline(tiny):  # noqa: F811
    p = Pipeline.from_checkpoints(tiny.checkpoints)
    before = p.point
    images = _random_images([(32, 32, 3)] * 2)
    p.predict_volume(images, p.point.override(threshold=0.0, lcc=True, tta=True, gate=False))
    assert p.point is before


def test_train_config_threshold_is_two_fields_and_old_configs_still_load():
    from flaxtumor.config import Config

    old_cls = Config().to_dict()
    del old_cls["train"]["cls_threshold"], old_cls["train"]["mask_threshold"]
    old_seg = json.loads(json.dumps(old_cls))
    old_cls["train"].update(task="cls", threshold=0.3)
    old_seg["train"].update(task="seg", threshold=0.4)
    cls, seg = Config.from_dict(old_cls).train, Config.from_dict(old_seg).train
    assert (cls.cls_threshold, cls.mask_threshold) == (0.3, 0.5)
    assert (seg.cls_threshold, seg.mask_threshold) == (0.5, 0.4)
    assert "threshold" not in Config().to_dict()["train"]
    with pytest.raises(ValueError, match="contradicts"):
        Config.from_dict({"train": {"task": "cls", "threshold": 0.3, "cls_threshold": 0.6}})


def test_slice_warnings_name_gray_input_a_grey_background_and_a_lone_slice_for_a_2_5d_segmenter():
    from flaxtumor.data.preprocess import Preprocessing
    from flaxtumor.inference import GRAY_WARNING, LONE_SLICE_WARNING, background_warning, context_warning, slice_warnings

    flat, context = Preprocessing(32, "image_zscore"), Preprocessing(32, "image_zscore", context_slices=1)
    colour, gray = _random_images([(8, 8, 3)])[0], np.zeros((8, 8), np.uint8)
    assert slice_warnings([colour], flat, False) == [""] and slice_warnings([gray] * 5, flat, True) == [GRAY_WARNING] * 5
    assert context_warning(flat, 1, False) is None and context_warning(context, 5, True) is None
    assert context_warning(context, 1, True) == context_warning(context, 5, False) == LONE_SLICE_WARNING
    assert slice_warnings([gray, gray], context, False) == [f"{GRAY_WARNING}; {LONE_SLICE_WARNING}"] * 2
    # A head (FLAIR 100) on a background whose pre-contrast reads 80: named with its level, per volume or per slice.
    head = np.zeros((32, 32, 3), np.uint8)
    head[8:24, 8:24] = (90, 100, 110)
    grey = head.copy()
    grey[..., 0] = np.where(head[..., 1] > 0, 120, 80)
    note = background_warning(((0, 80),))
    assert "pre-contrast reads 80" in note and background_warning(()) is None
    assert slice_warnings([head, grey], flat, False) == ["", note]  # loose slices: each its own
    assert slice_warnings([head, head, grey], flat, True) == [""] * 3  # one grey slice of three: the volume is not
    assert slice_warnings([grey, grey, head], flat, True) == [note] * 3
