"""The PyTorch reference for bench/predict_startup.py: a plain script doing what `flaxtumor.predict` does for one
patient folder, with the same two architectures (tests/models/torch_reference.py).

    python bench/torch_predict.py PATIENT_DIR --out DIR --weights DIR [--size 128] [--segmenters N] [--save-weights-only]

It loads both models' weights from .pt files (written once with --save-weights-only, random values: only the time
counts), reads every slice (TIFF/PNG), z-scores and resizes it to --size, classifies and segments every slice in
batches of 8 under `torch.inference_mode()` (with `--segmenters N`, N ResUNets whose probabilities are averaged, as
a shipped ensemble does), resizes the masks back and writes them as PNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.models.torch_reference import TorchResUNet, torch_classifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("patient", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--segmenters", type=int, default=1, help="ResUNets averaged (an ensemble's members)")
    ap.add_argument("--save-weights-only", action="store_true")
    args = ap.parse_args()
    classifier, segmenters = torch_classifier(), [TorchResUNet() for _ in range(args.segmenters)]
    if args.save_weights_only:
        args.weights.mkdir(parents=True, exist_ok=True)
        torch.save(classifier.state_dict(), args.weights / "classifier.pt")
        for k, segmenter in enumerate(segmenters):
            torch.save(segmenter.state_dict(), args.weights / f"segmenter_{k}.pt")
        return
    classifier.load_state_dict(torch.load(args.weights / "classifier.pt"))
    for k, segmenter in enumerate(segmenters):
        segmenter.load_state_dict(torch.load(args.weights / f"segmenter_{k}.pt"))
        segmenter.eval()
    classifier.eval()
    files = sorted((p for p in args.patient.iterdir() if p.suffix in (".tif", ".png") and "_mask" not in p.stem),
                   key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(args.size, args.size), mode="bilinear", antialias=True)
    x = (x - x.mean((1, 2, 3), keepdim=True)) / (x.std((1, 2, 3), keepdim=True) + 1e-6)
    with torch.inference_mode():
        probs = torch.cat([torch.sigmoid(classifier(b)) for b in x.split(8)])
        masks = torch.cat([sum(torch.sigmoid(s(b)) for s in segmenters) / len(segmenters)
                           for b in x.split(8)]) >= 0.5
    args.out.mkdir(parents=True, exist_ok=True)
    for p, m, im, prob in zip(files, masks[:, 0].numpy(), images, probs.numpy()):
        mask = Image.fromarray(m.astype(np.uint8) * 255).resize(im.shape[1::-1], Image.NEAREST)
        mask.save(args.out / f"{p.stem}_pred.png")


if __name__ == "__main__":
    main()
