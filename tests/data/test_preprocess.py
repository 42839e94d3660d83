"""The one preprocessing function: sizes, dtypes, each normalisation's definition, and the brain crop's box and its
way back."""

import numpy as np
import pytest

from flaxtumor.data.preprocess import (
    BRAIN_THRESHOLD, CROP_MARGIN, Box, Preprocessing, crop_box, mask_at_input_size, mask_targets, preprocess,
    resize_mask, uncrop_probabilities,
)


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)


def test_zscores(volume: np.ndarray) -> None:
    image = preprocess(volume, Preprocessing(20, "image_zscore"))
    assert image.shape == (4, 20, 20, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image.mean(axis=(1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(image.std(axis=(1, 2)), 1, atol=1e-3)
    vol = preprocess(volume, Preprocessing(20, "volume_zscore"))
    np.testing.assert_allclose(vol.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(vol.std(axis=(0, 1, 2)), 1, atol=1e-3)
    assert np.isfinite(preprocess(np.zeros((1, 8, 8, 3), np.uint8), Preprocessing(8, "image_zscore"))).all()


def test_imagenet_and_caffe(volume: np.ndarray) -> None:
    x = volume.astype(np.float32)
    imagenet = (x / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(preprocess(volume, Preprocessing(40, "imagenet")), imagenet, atol=1e-5)
    caffe = x[..., ::-1] - [103.939, 116.779, 123.68]  # BGR
    np.testing.assert_allclose(preprocess(volume, Preprocessing(40, "caffe")), caffe, atol=1e-4)


def test_spec_round_trip_and_validation() -> None:
    spec = Preprocessing(128, "volume_zscore")
    assert Preprocessing.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="normalisation"):
        Preprocessing(128, "minmax")


def test_resize_mask_is_nearest() -> None:
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:20] = True
    small = resize_mask(mask, (20, 20))
    assert small.dtype == bool and small.sum() == 50


def _ellipses(n: int, size: int = 256) -> list[np.ndarray]:
    """Bool (size, size) ellipses of random centre and radii 3-30 px: tumour outlines at the slices' own size."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        (cy, cx), (ry, rx) = rng.uniform(60, 196, 2), rng.uniform(3, 30, 2)
        out.append((yy - cy) ** 2 / ry**2 + (xx - cx) ** 2 / rx**2 <= 1)
    return out


def _round_trip(mask: np.ndarray, mode: str) -> np.ndarray:
    """A perfect model of `mode`'s targets at half size: its targets taken as probabilities and drawn back at the
    input size as the pipeline draws masks (`mask_at_input_size`, threshold 0.5)."""
    targets = mask_targets(mask, (mask.shape[0] // 2, mask.shape[1] // 2), mode).astype(np.float32)
    return mask_at_input_size(targets, 0.5, Box(0, 0, *mask.shape), mask.shape)


def test_nearest_targets_sit_half_a_pixel_up_and_left_and_area_targets_do_not() -> None:
    """Why DataConfig.mask_resize "area" exists: at 2x, nearest-neighbour targets are taken half an input pixel below
    and right of each model pixel's centre, so even a model that learns them perfectly draws its outlines half a pixel
    up and left of the truth; coverage targets are centred, as the images are."""
    shift = {"nearest": [], "area": []}
    dice = {"nearest": [], "area": []}
    for mask in _ellipses(60):
        for mode in shift:
            drawn = _round_trip(mask, mode)
            shift[mode].append(np.argwhere(drawn).mean(0) - np.argwhere(mask).mean(0))
            dice[mode].append(2 * (drawn & mask).sum() / (drawn.sum() + mask.sum()))
    np.testing.assert_allclose(np.mean(shift["nearest"], axis=0), [-0.5, -0.5], atol=0.05)
    np.testing.assert_allclose(np.mean(shift["area"], axis=0), [0.0, 0.0], atol=0.05)
    assert np.mean(dice["area"]) > 0.99 > 0.97 > np.mean(dice["nearest"])


def test_area_targets_are_the_covered_share_of_each_pixel() -> None:
    mask = np.zeros((8, 8), bool)
    mask[1:5, 2:5] = True  # rows 1-4, columns 2-4: edges through the middle of 2x2 blocks
    coverage = mask_targets(mask, (4, 4), "area")
    assert coverage.dtype == np.float16
    np.testing.assert_array_equal(coverage, [[0, 0.5, 0.25, 0], [0, 1, 0.5, 0], [0, 0.5, 0.25, 0], [0, 0, 0, 0]])
    assert coverage.sum() * 4 == mask.sum()  # the box filter keeps the area
    assert mask_targets(mask, (4, 4), "nearest").dtype == bool
    with pytest.raises(ValueError, match="unknown mask resize 'bilinear'"):
        mask_targets(mask, (4, 4), "bilinear")


# -- the brain crop ---------------------------------------------------------------------------------------------------


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    """uint8 (H, W, 3): a bright disc on black; its bounding box is centre +- radius."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.zeros((*shape, 3), np.uint8)
    image[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2] = 180
    return image


def test_crop_box_of_a_volume_is_the_union_box_plus_margin_made_square() -> None:
    m = CROP_MARGIN
    # Two slices: the volume's box covers both discs, rows 30..70 and columns 40..60, so it is 41 tall, 21 wide.
    volume = np.stack([_disc((128, 128), (40, 50), 10), _disc((128, 128), (60, 50), 10)])
    box = crop_box(volume, "brain")
    assert box.height == box.width == 41 + 2 * m
    assert (box.top, box.left) == (30 - m, 50 - (41 + 2 * m) // 2)
    assert crop_box(list(volume), "brain") == box  # a list of slices is the same volume
    assert crop_box(volume[:1], "brain") == Box(30 - m, 40 - m, 21 + 2 * m, 21 + 2 * m)  # one slice: its own
    assert crop_box(volume, "none") == Box(0, 0, 128, 128)


def test_crop_box_is_clamped_into_the_image_and_empty_slices_give_the_whole_image() -> None:
    corner = crop_box(_disc((100, 120), (5, 115), 4)[None], "brain")  # disc at the top-right corner
    side = 9 + 2 * CROP_MARGIN
    assert corner == Box(0, 120 - side, side, side)  # shifted inside, still square
    wide = crop_box(_disc((40, 200), (20, 100), 18)[None], "brain")  # a square would be taller than the image
    assert wide.top == 0 and wide.height == 40 and wide.width == 37 + 2 * CROP_MARGIN
    black = np.zeros((3, 64, 80, 3), np.uint8)
    black[:, 10, 10] = BRAIN_THRESHOLD  # at the threshold is still background
    assert crop_box(black, "brain") == Box(0, 0, 64, 80)


@pytest.mark.parametrize("scale", [1, 2])
def test_a_mask_inside_the_box_survives_crop_and_uncrop(scale: int) -> None:
    image = _disc((96, 96), (40, 44), 20)
    box = crop_box(image[None], "brain")
    assert box.height == box.width == 41 + 2 * CROP_MARGIN and box.height % 2 == 1
    box = Box(box.top, box.left, box.height + 1, box.width + 1)  # an even side, so scale 2 is an integer scale
    size = box.height // scale
    # A mask that is constant on scale x scale blocks of the box, so nearest down- and up-sampling are exact.
    coarse = np.zeros((size, size), bool)
    coarse[size // 4 : size // 2, size // 3 : size - 3] = True
    mask = np.zeros((96, 96), bool)
    mask[box.rows, box.cols] = np.kron(coarse, np.ones((scale, scale), bool))
    small = resize_mask(mask[box.rows, box.cols], (size, size))
    assert np.array_equal(small, coarse)
    # Certain probabilities (0 or 1) on the coarse grid: bilinear x2 puts 0.75 and 0.25 either side of each edge.
    assert np.array_equal(mask_at_input_size(small.astype(np.float32), 0.5, box, (96, 96)), mask)


def test_cropped_preprocess_resizes_the_box_and_masks_go_back_into_it() -> None:
    image = _disc((90, 90), (45, 45), 20)[None]
    spec = Preprocessing(16, "image_zscore", crop="brain")
    box = crop_box(image, "brain")
    expected = preprocess(np.ascontiguousarray(image[:, box.rows, box.cols]), Preprocessing(16, "image_zscore"))
    np.testing.assert_array_equal(preprocess(image, spec), expected)
    probabilities = np.random.default_rng(0).random((16, 16), np.float32)
    whole = mask_at_input_size(probabilities, 0.5, Box(0, 0, 37, 53), (37, 53))
    assert np.array_equal(whole, uncrop_probabilities(probabilities, Box(0, 0, 37, 53), (37, 53)) >= 0.5)
    assert whole.shape == (37, 53) and 0 < whole.sum() < whole.size
    for probability, threshold in ((1.0, 0.5), (0.0, 0.0)):  # a mask of the whole box, and nothing outside it
        pasted = mask_at_input_size(np.full((16, 16), probability, np.float32), threshold, box, (90, 90))
        assert pasted.sum() == box.height * box.width and pasted[box.rows, box.cols].all()


def test_masks_are_thresholded_after_resizing_so_outlines_are_drawn_at_the_input_resolution() -> None:
    # The ideal model at half resolution: each of its pixels holds the fraction of its 2x2 input pixels inside a
    # round tumour. Thresholding first and resizing the mask draws the outline in 2x2 blocks; resizing the
    # probabilities first and thresholding at the input size recovers the outline more closely.
    yy, xx = np.mgrid[:256, :256]
    truth = (yy - 101.3) ** 2 + (xx - 140.6) ** 2 <= 23.7**2
    probabilities = truth.reshape(128, 2, 128, 2).mean(axis=(1, 3)).astype(np.float32)
    box = Box(0, 0, 256, 256)
    blocky = resize_mask(probabilities >= 0.5, (256, 256))
    smooth = mask_at_input_size(probabilities, 0.5, box, (256, 256))
    dice = lambda m: 2 * (m & truth).sum() / (m.sum() + truth.sum())  # noqa: E731
    assert dice(smooth) > dice(blocky) + 0.005
    assert (smooth ^ truth).sum() < (blocky ^ truth).sum() / 2


def test_crop_in_the_spec_round_trips_and_old_specs_mean_none() -> None:
    spec = Preprocessing(64, "image_zscore", crop="brain")
    assert spec.to_dict()["crop"] == "brain" and Preprocessing.from_dict(spec.to_dict()) == spec
    old = {"image_size": 64, "normalisation": "image_zscore"}  # metadata written before the crop existed
    assert Preprocessing.from_dict(old).crop == "none"
    assert Preprocessing.from_dict(old).to_dict() == old  # and it is written back exactly as it was
    with pytest.raises(ValueError, match="crop"):
        Preprocessing(64, "image_zscore", crop="skull")
