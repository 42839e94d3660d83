"""Image and mask reading: every supported format, and one clear DataError per bad file."""

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from flaxtumor.data.io import DataError, image_header, image_shape, read_image, read_mask


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_rgb_roundtrip(tmp_path: Path, rgb: np.ndarray, suffix: str) -> None:
    path = tmp_path / f"a{suffix}"
    tifffile.imwrite(path, rgb, photometric="rgb") if suffix == ".tif" else Image.fromarray(rgb).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8 and np.array_equal(out, rgb)
    assert image_shape(path) == (20, 30)


def test_jpeg_is_read_as_rgb(tmp_path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(tmp_path / "a.jpg")
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8


def test_gray_is_replicated(tmp_path: Path, rgb: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "g.tif", rgb[..., 0])
    out = read_image(tmp_path / "g.tif")
    assert out.shape == (20, 30, 3) and all(np.array_equal(out[..., c], rgb[..., 0]) for c in range(3))


def test_rgba_drops_alpha(tmp_path: Path, rgb: np.ndarray) -> None:
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert np.array_equal(read_image(tmp_path / "a.png"), rgb)


def test_palette_is_converted(tmp_path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_uint16_is_rescaled_by_slice_maximum(tmp_path: Path, suffix: str) -> None:
    a = np.zeros((8, 8), np.uint16)
    a[0, 0], a[1, 1] = 1000, 500
    path = tmp_path / f"u{suffix}"
    tifffile.imwrite(path, a) if suffix == ".tif" else Image.fromarray(a).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8 and out[0, 0, 0] == 255 and out[1, 1, 0] == 128 and out[2, 2, 0] == 0


def test_masks_binary(tmp_path: Path) -> None:
    m = np.zeros((6, 6), np.uint8)
    m[2:4, 2:4] = 255
    tifffile.imwrite(tmp_path / "m.tif", m)
    Image.fromarray(m).save(tmp_path / "m.png")
    tifffile.imwrite(tmp_path / "m16.tif", m.astype(np.uint16) * 257)
    for name in ("m.tif", "m.png", "m16.tif"):
        out = read_mask(tmp_path / name)
        assert out.dtype == bool and out.sum() == 4 and out[2, 2]


def test_non_binary_mask(tmp_path: Path) -> None:
    m = np.zeros((6, 6), np.uint8)
    m[0, 0], m[1, 1] = 255, 128
    tifffile.imwrite(tmp_path / "m.tif", m)
    with pytest.raises(DataError, match=r"^.*m\.tif: mask is not binary: values \{0, 128, 255\}"):
        read_mask(tmp_path / "m.tif")


def test_zero_byte(tmp_path: Path) -> None:
    (tmp_path / "z.tif").write_bytes(b"")
    with pytest.raises(DataError, match=r"z\.tif: zero-byte file"):
        read_image(tmp_path / "z.tif")
    with pytest.raises(DataError, match=r"z\.tif: zero-byte file"):
        read_mask(tmp_path / "z.tif")


@pytest.mark.parametrize("suffix", [".tif", ".png", ".jpg"])
def test_corrupt(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"c{suffix}"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DataError, match=rf"c\{suffix}: unreadable or corrupt image"):
        read_image(path)
    with pytest.raises(DataError, match="unreadable or corrupt image"):
        image_shape(path)


@pytest.mark.parametrize("compression", [None, "zlib"])  # kaggle_3m TIFFs are deflate-compressed
def test_truncated_tiff(tmp_path: Path, rgb: np.ndarray, compression: str | None) -> None:
    tifffile.imwrite(tmp_path / "t.tif", rgb, photometric="rgb", compression=compression)
    data = (tmp_path / "t.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"t\.tif: unreadable or corrupt image"):
        read_image(tmp_path / "t.tif")


def test_multipage_tiff_is_refused(tmp_path: Path, rgb: np.ndarray) -> None:
    for _ in range(4):
        tifffile.imwrite(tmp_path / "s.tif", rgb, photometric="rgb", append=True)
    with pytest.raises(DataError, match=r"s\.tif: multi-page TIFF \(4 pages\)"):
        read_image(tmp_path / "s.tif")
    with pytest.raises(DataError, match="multi-page"):
        image_shape(tmp_path / "s.tif")


def test_error_message_starts_with_path(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_image(tmp_path / "missing.png")
    assert str(info.value) == f"{tmp_path / 'missing.png'}: file not found"


def test_gray_alpha_drops_alpha(tmp_path: Path, rgb: np.ndarray) -> None:
    Image.fromarray(rgb[..., 0]).convert("LA").save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    assert out.shape == (20, 30, 3) and np.array_equal(out[..., 2], rgb[..., 0])


def test_data_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(DataError(Path("/x/a.tif"), "zero-byte file")))
    assert isinstance(error, DataError) and str(error) == "/x/a.tif: zero-byte file" and error.path == Path("/x/a.tif")


def test_header_reads_the_full_page_shape_and_dtype(tmp_path: Path, rgb: np.ndarray) -> None:
    """A volumetric TIFF's shape starts with its depth: (H, W) must come from the tags, not shape[:2]."""
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((4, 40, 50), np.uint8), volumetric=True, photometric="minisblack")
    header = image_header(tmp_path / "v.tif")
    assert (header.height, header.width, header.depth, header.channels) == (40, 50, 4, 1)
    assert header.nbytes == 4 * 40 * 50 and "volumetric image (depth 4)" in header.problem()
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((20, 30, 7), np.uint16), photometric="minisblack", planarconfig="contig")
    header = image_header(tmp_path / "c.tif")
    assert (header.height, header.width, header.channels, header.dtype) == (20, 30, 7, np.uint16)
    assert header.nbytes == 20 * 30 * 7 * 2 and "7 channels per pixel" in header.problem()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    header = image_header(tmp_path / "a.png")
    assert (header.height, header.width, header.channels, header.dtype, header.problem()) == (20, 30, 3, np.uint8, None)
    # uint8 RGB: the array, then the uint8 (H, W, 3) result and its intermediate
    assert header.decode_bytes() == 20 * 30 * (3 + 3 + 3)


@pytest.mark.parametrize(
    "case, problem",
    [("volume", "volumetric image (depth 3)"), ("channels", "5 channels per pixel"), ("float", "unsupported pixel type float32")],
)
def test_non_slices_are_refused_before_decoding(tmp_path: Path, case: str, problem: str, monkeypatch) -> None:
    path = tmp_path / f"{case}.tif"
    if case == "volume":
        tifffile.imwrite(path, np.zeros((3, 32, 32), np.uint8), volumetric=True, photometric="minisblack")
    elif case == "channels":
        tifffile.imwrite(path, np.zeros((32, 32, 5), np.uint8), photometric="minisblack", planarconfig="contig")
    else:
        tifffile.imwrite(path, np.zeros((32, 32), np.float32))
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: pytest.fail("decoded"))
    for read in (image_shape, read_image):
        with pytest.raises(DataError, match=re.escape(problem)):
            read(path)


def test_pil_headers_count_what_the_decoder_makes(tmp_path: Path, rgb: np.ndarray) -> None:
    """Palette images are converted to RGB(A), so they count 4 channels; gray + alpha counts 2; 16-bit gray 2 bytes."""
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.fromarray(rgb[..., 0]).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "g16.png")
    got = {n: image_header(tmp_path / n) for n in ("p.png", "la.png", "g16.png")}
    assert [(h.channels, h.dtype.itemsize, h.problem()) for h in got.values()] == [(4, 1, None), (2, 1, None), (1, 2, None)]


def test_animated_png_is_refused_as_multi_page(tmp_path: Path, rgb: np.ndarray) -> None:
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(tmp_path / "a.png", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=r"a\.png: multi-page PNG \(2 pages\)"):
        read_image(tmp_path / "a.png")
