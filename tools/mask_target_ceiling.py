"""What the training targets alone cost: the Dice of a perfect model of each kind of target (`DataConfig.mask_resize`).

Every true mask of the dataset is made into the targets a run at --size trains on (`mask_targets`), taken as that
run's output probabilities and drawn back at the slice's own size as the pipeline draws masks (`mask_at_input_size`,
threshold 0.5), then scored as cross-validation scores: per-patient volumetric Dice (patients without tumour are not
scored) and tumour-slice Dice. No model is involved: a model of those targets can at best reach these numbers.

    python tools/mask_target_ceiling.py --data ../shared/lgg --out reports/mask_target_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flaxtumor import metrics as M  # noqa: E402
from flaxtumor.data.io import read_mask  # noqa: E402
from flaxtumor.data.lgg import Patient, discover  # noqa: E402
from flaxtumor.data.preprocess import Box, mask_at_input_size, mask_targets  # noqa: E402


def ceiling(patients: Sequence[Patient], size: int, mode: str) -> dict:
    """Per-patient Dice, their summary and tumour-slice Dice of a perfect model of `mode`'s targets at `size`."""
    per_patient, drawn, truth = {}, [], []
    for p in patients:
        labelled = [s for s in p.slices if s.mask_path is not None]  # an unlabelled slice has nothing to score
        if not labelled:
            continue
        masks = np.stack([read_mask(s.mask_path) for s in labelled])
        box = Box(0, 0, *masks.shape[1:])
        back = np.stack([mask_at_input_size(mask_targets(m, (size, size), mode).astype(np.float32), 0.5, box, m.shape)
                         for m in masks])
        if masks.any():
            per_patient[p.patient_id] = M.dice(back, masks)
        drawn += list(back)
        truth += list(masks)
    summary = M.summarise_patient_dice(per_patient)
    return {"mean": summary["mean"], "median": summary["median"], "worst": summary["min"],
            "tumour_slice_dice": M.tumour_slice_dice(drawn, truth), "per_patient_dice": per_patient}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="kaggle_3m folder or its parent")
    ap.add_argument("--size", type=int, default=128, help="the run's image size (default 128, the shipped recipe's)")
    ap.add_argument("--out", type=Path, default=None, help="also write the report (JSON) here")
    args = ap.parse_args(argv)
    patients = discover(args.data)
    report = {"protocol": __doc__.split("\n\n")[1].replace("\n", " "), "size": args.size,
              "n_patients": len(patients)}
    for mode in ("nearest", "area"):
        report[mode] = ceiling(patients, args.size, mode)
        r = report[mode]
        print(f"{mode}: per-patient Dice mean {r['mean']:.4f}, median {r['median']:.4f}, worst {r['worst']:.4f}; "
              f"tumour-slice Dice {r['tumour_slice_dice']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
