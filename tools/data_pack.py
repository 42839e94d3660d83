"""Train on a machine that has no copy of the dataset (a lent GPU), from one compressed pack of the slices.

kaggle_3m is 237 MB of compressed TIFFs, more than such a machine's transfer limit. Training never reads them past
the first epoch anyway: it reads each slice as `decode_all` leaves it (its patient's grey background removed, cropped
to its patient's box with crop "brain", resized to the run's image size, uint8) and, for tumour sampling, each
slice's tumour area at full resolution. The pack holds exactly those, lzma-compressed, plus the slice list; `train`
serves the data pipeline from it and otherwise runs `train.py` unchanged, so a fold trained from the pack is the fold
`train.py` would train from the TIFFs (tests/test_data_pack.py checks the batches and a whole run are identical). Scoring at full resolution (crossval's out-of-fold step,
compare_runs) still needs the TIFFs, so it runs where the dataset is.

    python tools/data_pack.py pack --data ../shared/lgg --size 128 [--crop brain] [--mask-resize area] \
        --out .remote/lgg128.pack
    python tools/data_pack.py train --pack .remote/lgg128.pack -- --config runs/cv/config.json --fold 0 --out ...

A pack serves runs at its own image size, crop (`--crop`) and mask targets (`--mask-resize`); 2.5D runs (context
slices) stack its slices as they stack the decoded ones. A run that reads slices otherwise is refused, never
approximated.
"""

from __future__ import annotations

import argparse
import io
import lzma
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flaxtumor.config import DataConfig  # noqa: E402
from flaxtumor.data import pipeline  # noqa: E402
from flaxtumor.data.lgg import Patient, Slice, load_dataset  # noqa: E402


@dataclass(frozen=True)
class Pack:
    """Every slice of a dataset as training reads it at one image size and crop."""

    size: int
    crop: str  # the preprocessing's crop mode ("none" or "brain")
    patients: tuple[Patient, ...]
    images: np.ndarray  # uint8 (N, S, S, 3), in the order of the patients' slices
    masks: np.ndarray  # bool (N, S, S), or float16 coverage with mask_resize "area"
    areas: np.ndarray  # int64 (N,) tumour pixels at full resolution
    mask_resize: str = "nearest"  # DataConfig.mask_resize: how the masks were made

    @property
    def slices(self) -> list[Slice]:
        """Every slice, in the order of the rows of `images`, `masks` and `areas`."""
        return [s for p in self.patients for s in p.slices]

    def rows(self) -> dict[Path, int]:
        return {s.image_path: i for i, s in enumerate(self.slices)}


def build(data: DataConfig) -> Pack:
    patients = tuple(load_dataset(data))
    slices = [s for p in patients for s in p.slices]
    # whole patients: their readings as training's
    decoded = pipeline.decode_all(slices, data.image_size, data.crop, data.mask_resize)
    return Pack(data.image_size, data.crop, patients, decoded.images, decoded.masks, pipeline.tumour_areas(slices),
                data.mask_resize)


def save(pack: Pack, path: Path) -> Path:
    slices = pack.slices
    table = {
        "size": np.int64(pack.size),
        "crop": np.array(pack.crop),
        "patient_id": np.array([s.patient_id for s in slices]),
        "slice_index": np.array([s.slice_index for s in slices], np.int64),
        "image_path": np.array([str(s.image_path) for s in slices]),
        "mask_path": np.array(["" if s.mask_path is None else str(s.mask_path) for s in slices]),
        "has_tumour": np.array([s.has_tumour for s in slices]),
        "images": pack.images,
        "mask_resize": np.array(pack.mask_resize),
        **({"masks": np.packbits(pack.masks, axis=-1)} if pack.mask_resize == "nearest" else {"coverage": pack.masks}),
        "areas": pack.areas,
    }
    raw = io.BytesIO()
    np.savez(raw, **table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(raw.getvalue(), preset=6))
    return path


def load(path: Path) -> Pack:
    t = np.load(io.BytesIO(lzma.decompress(path.read_bytes())))
    size = int(t["size"])
    slices = [Slice(str(pid), int(k), Path(str(ip)), Path(str(mp)) if str(mp) else None, bool(h))
              for pid, k, ip, mp, h in zip(t["patient_id"], t["slice_index"], t["image_path"], t["mask_path"],
                                           t["has_tumour"])]
    by_patient: dict[str, list[Slice]] = {}
    for s in slices:
        by_patient.setdefault(s.patient_id, []).append(s)
    patients = tuple(Patient(pid, tuple(ss)) for pid, ss in by_patient.items())
    mask_resize = str(t["mask_resize"]) if "mask_resize" in t.files else "nearest"  # packs before the option
    masks = (np.unpackbits(t["masks"], axis=-1, count=size).astype(bool) if mask_resize == "nearest"
             else t["coverage"])
    return Pack(size, str(t["crop"]), patients, t["images"], masks, t["areas"], mask_resize)


def serve(pack: Pack, patch: Callable[[object, str, object], None] = setattr) -> None:
    """Points the data pipeline and the training loop at the pack instead of the dataset folder (`patch`: the tests
    pass pytest's monkeypatch.setattr, which undoes it)."""
    from flaxtumor.data import lgg
    from flaxtumor.train import loop

    rows = pack.rows()

    def dataset(data: DataConfig) -> list[Patient]:
        if (data.image_size, data.crop, data.mask_resize) != (pack.size, pack.crop, pack.mask_resize):
            raise ValueError(f"the pack holds {pack.size}² slices with crop {pack.crop!r} and {pack.mask_resize!r} "
                             f"masks; this run reads {data.image_size}² slices with crop {data.crop!r} and "
                             f"{data.mask_resize!r} masks")
        return list(pack.patients)

    def read(s: Slice, size: int, reading: pipeline.Reading = pipeline.Reading(), mask_resize: str = "nearest"
             ) -> tuple[np.ndarray, np.ndarray]:
        i = rows[s.image_path]  # background repair and crop were applied when the pack was built, per whole patient
        return pack.images[i], pack.masks[i]

    patch(lgg, "resolve_root", Path)  # train.py checks the dataset folder exists; here it need not
    patch(loop, "load_dataset", dataset)
    patch(pipeline, "_load", read)
    patch(pipeline, "patient_readings", lambda slices, crop_mode="none": tuple(pipeline.Reading() for _ in slices))
    patch(pipeline, "tumour_areas", lambda slices: pack.areas[[rows[s.image_path] for s in slices]])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="write the pack of a dataset folder")
    a.add_argument("--data", required=True)
    a.add_argument("--size", type=int, default=128)
    a.add_argument("--crop", choices=("none", "brain"), default="none")
    a.add_argument("--mask-resize", choices=("nearest", "area"), default="nearest")
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("train", help="train.py, reading the pack; train.py's arguments follow --")
    b.add_argument("--pack", type=Path, required=True)
    b.add_argument("train_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command == "pack":
        path = save(build(DataConfig(root=args.data, image_size=args.size, crop=args.crop,
                                     mask_resize=args.mask_resize)), args.out)
        print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB")
        return 0
    serve(load(args.pack))
    from flaxtumor.train.cli import main as train_main

    rest = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    return train_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
