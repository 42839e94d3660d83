"""Good and bad upload files for the UI tests, each made on the fly (nothing binary is committed)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def slice_array(size: int = 64, seed: int = 0) -> np.ndarray:
    """A head-like bright disc on black, uint8 (size, size, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    head = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2
    image = np.zeros((size, size, 3), np.uint8)
    image[head] = rng.integers(60, 160, (int(head.sum()), 3))
    return image


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def good_png(folder: Path, name: str = "slice.png", size: int = 64) -> Path:
    return write(folder / name, png_bytes(slice_array(size)))


def good_tiff(folder: Path, name: str = "slice.tif", size: int = 64) -> Path:
    tifffile.imwrite(folder / name, slice_array(size), photometric="rgb")
    return folder / name


def variant(folder: Path, kind: str) -> Path:
    """Accepted but unusual encodings: 16-bit, gray, RGBA, palette, JPEG."""
    rgb = slice_array()
    gray = rgb[..., 0]
    if kind == "gray16_png":
        return write(folder / "gray16.png", png_bytes(gray.astype(np.uint16) * 257))
    if kind == "rgb16_tiff":
        tifffile.imwrite(folder / "rgb16.tif", rgb.astype(np.uint16) * 200, photometric="rgb")
        return folder / "rgb16.tif"
    if kind == "gray_png":
        return write(folder / "gray.png", png_bytes(gray))
    if kind == "rgba_png":
        return write(folder / "rgba.png", png_bytes(np.dstack([rgb, np.full(gray.shape, 255, np.uint8)])))
    if kind == "palette_png":
        buf = io.BytesIO()
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(buf, format="PNG")
        return write(folder / "palette.png", buf.getvalue())
    if kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG")
        return write(folder / "slice.jpg", buf.getvalue())
    raise ValueError(kind)


def zip_of(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def bad_upload(folder: Path, case: str) -> tuple[list[Path], str]:
    """Files for one bad-upload case and a fragment the error message must contain."""
    png = png_bytes(slice_array())
    if case == "non_image":
        return [write(folder / "notes.txt", b"not an image\n")], "notes.txt: unsupported file type"
    if case == "wrong_extension":
        return [write(folder / "scan.tif", png)], "scan.tif: the content is PNG"
    if case == "text_as_png":
        return [write(folder / "fake.png", b"hello, I am text" * 10)], "fake.png: not a valid PNG"
    if case == "zero_byte":
        return [write(folder / "empty.png", b"")], "empty.png: zero-byte file"
    if case == "truncated_png":
        return [write(folder / "cut.png", png[: len(png) // 2])], "cut.png: unreadable or corrupt"
    if case == "truncated_jpeg":
        jpg = variant(folder, "jpeg").read_bytes()
        return [write(folder / "cut.jpg", jpg[: len(jpg) // 2])], "cut.jpg: unreadable or corrupt"
    if case == "truncated_tiff":
        tif = good_tiff(folder, "whole.tif").read_bytes()
        return [write(folder / "cut.tif", tif[:200])], "cut.tif: unreadable or corrupt"
    if case == "huge":
        # 10000x10000 1-bit PNG: ~100 MP but only a few kB on disk; must be refused from its header.
        path = folder / "huge.png"
        Image.new("1", (10000, 10000)).save(path, format="PNG")
        return [path], "huge.png: image too large (10000x10000"
    if case == "multipage_tiff":
        path = folder / "stack.tif"
        tifffile.imwrite(path, np.stack([slice_array()[..., 0]] * 3), photometric="minisblack")
        return [path], "stack.tif: multi-page TIFF"
    if case == "zip_no_images":
        return [zip_of(folder / "docs.zip", {"p/readme.txt": b"hi", "p/data.csv": b"a,b\n"})], "docs.zip: the zip holds no slices"
    if case == "zip_bomb_size":
        # 8 MiB of zeros compress to ~8 kB; the test limits allow 4 MiB uncompressed.
        return [zip_of(folder / "bomb.zip", {"p/a.png": bytes(8 * 2**20)})], "bomb.zip: would expand to 8 MiB"
    if case == "zip_bomb_entries":
        members = {f"p/{i}.txt": b"" for i in range(60)}  # test limits: 50 entries
        return [zip_of(folder / "many.zip", members)], "many.zip: 60 entries; the limit is 50"
    if case == "zip_slip":
        return [zip_of(folder / "slip.zip", {"../../evil.png": png})], "slip.zip: member '../../evil.png' has an unsafe path"
    if case == "zip_absolute":
        return [zip_of(folder / "abs.zip", {"/tmp/evil.png": png})], "abs.zip: member '/tmp/evil.png' has an unsafe path"
    if case == "zip_corrupt":
        data = zip_of(folder / "whole.zip", {"p/a.png": png}).read_bytes()
        return [write(folder / "broken.zip", data[: len(data) // 2])], "broken.zip: not a readable zip archive"
    if case == "zip_two_patients":
        return [zip_of(folder / "two.zip", {"a/1.png": png, "b/1.png": png})], "two.zip: images in 2 folders"
    if case == "too_many_files":  # test limits: 30 images
        return [write(folder / f"s_{i}.png", png) for i in range(31)], "Too many images: more than 30"
    if case == "mixed_sizes":
        return [good_png(folder, "a_1.png", 64), good_png(folder, "a_2.png", 96)], "must share one size"
    raise ValueError(case)


BAD_SINGLE = [
    "non_image", "wrong_extension", "text_as_png", "zero_byte", "truncated_png", "truncated_jpeg", "truncated_tiff",
    "huge", "multipage_tiff",
]
BAD_PATIENT = [
    "zip_no_images", "zip_bomb_size", "zip_bomb_entries", "zip_slip", "zip_absolute", "zip_corrupt", "zip_two_patients",
    "too_many_files", "mixed_sizes",
]
VARIANTS = ["gray16_png", "rgb16_tiff", "gray_png", "rgba_png", "palette_png", "jpeg"]
