"""Good and bad upload files for the UI tests, each made on the fly (nothing binary is committed)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
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
        return [zip_of(folder / "bomb.zip", {"p/a.png": bytes(8 * 2**20)})], "bomb.zip: the submission would put 8 MiB on the server's disk"
    if case == "zip_bomb_entries":
        members = {f"p/{i}.txt": b"" for i in range(60)}  # test limits: 50 entries
        return [zip_of(folder / "many.zip", members)], "many.zip: 60 entries; the limit is 50"
    if case == "zip_slip":
        return [zip_of(folder / "slip.zip", {"../../evil.png": png})], "slip.zip: member '../../evil.png' has an unsafe path ('..')"
    if case == "zip_absolute":
        return [zip_of(folder / "abs.zip", {"/tmp/evil.png": png})], "abs.zip: member '/tmp/evil.png' has an absolute or drive path"
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


def volume_tiff(path: Path) -> Path:
    """Issue 14's volumetric TIFF: 32 x 32 x 2^20 (1 GiB decoded) in ~1 MB; written from one pre-compressed tile, so
    making it costs no gigabyte here either."""
    tile = zlib.compress(bytes(32 * 32 * 65536))
    tifffile.imwrite(path, (tile for _ in range(16)), shape=(32, 32, 1 << 20), dtype=np.uint8, volumetric=True,
                     tile=(32, 32, 65536), compression="zlib", photometric="minisblack")
    return path


def channels_tiff(path: Path, channels: int = 64, side: int = 4096) -> Path:
    """Issue 14's 4096 x 4096 x 64-channel TIFF (1 GiB decoded) in ~1 MB."""
    tile = zlib.compress(bytes(256 * 256 * channels))
    tifffile.imwrite(path, (tile for _ in range((side // 256) ** 2)), shape=(side, side, channels), dtype=np.uint8,
                     compression="zlib", photometric="minisblack", planarconfig="contig", tile=(256, 256))
    return path


HTML_NAME = '<a href="https://evil.example">Session expired, log in again<img src="https://evil.example/x.png">_1.tif'


def zip_with_symlink(path: Path, png: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("p/p_1.png", png)
        link = zipfile.ZipInfo("p/p_2.png")
        link.create_system = 3  # unix: the mode bits in the high word of external_attr
        link.external_attr = (0o120777 << 16)  # S_IFLNK
        zf.writestr(link, "/etc/passwd")
    return path


def zip64_claiming(path: Path, entries: int) -> Path:
    """A zip whose (zip64) end of central directory record claims `entries` entries; nothing else in it is valid."""
    head = b"PK\x03\x04" + bytes(26)
    record_at = len(head)
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, 46 * entries, 0)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, record_at, 1)
    eocd = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return write(path, head + record + locator + eocd)


def crafted(folder: Path, case: str) -> tuple[list[Path], str]:
    """Issue 14's crafted files: one case, and a fragment the error must contain."""
    png = png_bytes(slice_array())
    if case == "volume_tiff":
        return [volume_tiff(folder / "vol.tif")], "vol.tif: volumetric image (depth 32)"
    if case == "channels_tiff":
        return [channels_tiff(folder / "bands.tif")], "bands.tif: 64 channels per pixel"
    if case == "float_tiff":
        tifffile.imwrite(folder / "float.tif", slice_array()[..., 0].astype(np.float32))
        return [folder / "float.tif"], "float.tif: unsupported pixel type float32"
    if case == "png_junk":  # a PNG signature, then junk: the decoder's error names the temp path
        return [write(folder / "junk.png", png[:8] + b"\x00junk" * 50)], "junk.png: unreadable or corrupt image"
    if case == "zip_html_name":
        return [zip_of(folder / "html.zip", {f"p/{HTML_NAME}": b"not a tiff"})], "html.zip/p/&lt;a href="
    if case == "zip_entries_index":
        return [zip64_claiming(folder / "index.zip", 400_000)], "index.zip: 400000 entries; the limit is 50"
    if case == "zip_symlink":
        return [zip_with_symlink(folder / "link.zip", png)], "link.zip: member 'p/p_2.png' is a symbolic link"
    if case in UNSAFE_MEMBERS:
        member, problem = UNSAFE_MEMBERS[case]
        return [zip_of(folder / f"{case}.zip", {"p/p_1.png": png, member: png})], f"member {member!r} {problem}"
    if case == "zips_past_budget":  # four zips, each under the 4 MiB budget, together over it
        return ([zip_of(folder / f"part{k}.zip", {f"p{k}/p_{k}.png": png + bytes(1536 * 1024)}) for k in range(4)],
                "part2.zip: the submission would put")
    raise ValueError(case)


# Issue 15, item 4: `..` anywhere, Windows separators and drives, absolute paths.
UNSAFE_MEMBERS = {
    "member_dotdot_inside": ("p/../../x.png", "has an unsafe path ('..')"),
    "member_backslash": ("..\\x.png", "has an unsafe path ('..')"),
    "member_drive": ("C:x.png", "has an absolute or drive path"),
    "member_drive_backslash": ("C:\\x\\p_2.png", "has an absolute or drive path"),
    "member_absolute": ("/abs/x.png", "has an absolute or drive path"),
    "member_unc": ("\\\\server\\share\\x.png", "has an absolute or drive path"),
}
CRAFTED_SINGLE = ["volume_tiff", "channels_tiff", "float_tiff", "png_junk"]
CRAFTED_PATIENT = ["zip_html_name", "zip_entries_index", "zip_symlink", "zips_past_budget", *UNSAFE_MEMBERS]


BAD_SINGLE = [
    "non_image", "wrong_extension", "text_as_png", "zero_byte", "truncated_png", "truncated_jpeg", "truncated_tiff",
    "huge", "multipage_tiff",
]
BAD_PATIENT = [
    "zip_no_images", "zip_bomb_size", "zip_bomb_entries", "zip_slip", "zip_absolute", "zip_corrupt", "zip_two_patients",
    "too_many_files", "mixed_sizes",
]
VARIANTS = ["gray16_png", "rgb16_tiff", "gray_png", "rgba_png", "palette_png", "jpeg"]


# ---- NIfTI uploads (written by the tests themselves) ----------------------------------------------------------------

NIFTI_SHAPE = (40, 48, 6)  # stored (x, y, z); axial slices are 48x40 (H x W), all sides >= the 32 px minimum
NIFTI_AFFINE = np.array([[-0.9, 0, 0, 12.0], [0, -0.9, 0, 20.0], [0, 0, 3.0, -10.0], [0, 0, 0, 1]])  # LPS


def save_nifti(data: np.ndarray, path: Path, affine: np.ndarray = NIFTI_AFFINE, dtype=np.float32) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    nib.save(img, path)
    return path


def nifti_patient(folder: Path, prefix: str = "BraTS_007", seg: bool = True, shape=NIFTI_SHAPE,
                  names=("t1", "flair", "t1ce")) -> dict[str, Path]:
    """Three role volumes (a noisy head with a bright blob) and, with `seg`, a binary truth of the blob."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    idx = np.indices(shape) / (np.array(shape)[:, None, None, None] - 1) * 2 - 1
    head = (idx**2).sum(0) < 1.2
    blob = ((idx - np.array([0.2, -0.1, 0.0])[:, None, None, None]) ** 2).sum(0) < 0.12
    paths = {}
    for role, name in zip(("pre", "flair", "post"), names):
        volume = np.where(head, 100 + 20 * rng.standard_normal(shape), 0)
        volume[blob] = 400.0
        paths[role] = save_nifti(volume, folder / f"{prefix}_{name}.nii.gz")
    if seg:
        paths["truth"] = save_nifti(blob, folder / f"{prefix}_seg.nii.gz", dtype=np.uint8)
    return paths
