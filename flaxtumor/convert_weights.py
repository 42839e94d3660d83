"""Convert ImageNet ResNet50 weights once into the directory `train.py --backbone-weights DST` and
`flaxtumor.models.load_resnet50(DST)` load.

    python -m flaxtumor.convert_weights resnet50.pth            converted/resnet50-tv
    python -m flaxtumor.convert_weights resnet50.safetensors    converted/resnet50-timm
    python -m flaxtumor.convert_weights resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5  converted/resnet50-keras
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flaxtumor.models.weights import METADATA_FILE, WeightsError, convert_source, save_converted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flaxtumor.convert_weights",
        description=(
            "Convert ResNet50 ImageNet weights (torchvision/timm .pth or .safetensors, Keras ResNet50 .h5) into a "
            "directory of Flax weights (weights.safetensors) plus metadata.json recording the layout and the "
            "preprocessing the weights expect (imagenet mean/std for torchvision, caffe for Keras). "
            "The mapping is strict: only the ImageNet head may be absent."
        ),
    )
    parser.add_argument("src", type=Path, help="source weights: .pth/.pt/.bin (needs torch), .safetensors or .h5")
    parser.add_argument("dst", type=Path, help="output directory (created)")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it already holds converted weights")
    args = parser.parse_args(argv)
    if (args.dst / METADATA_FILE).exists() and not args.force:
        print(f"error: {args.dst} already holds converted weights (use --force to overwrite)", file=sys.stderr)
        return 1
    try:
        flat, metadata = convert_source(args.src)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_converted(flat, metadata, args.dst)
    head = f"with a {metadata['num_classes']}-class head" if metadata["has_top"] else "without a head"
    print(f"{args.dst}: ResNet50 {metadata['layout']} layout, {head}, {len(flat)} tensors; "
          f"expects {metadata['normalisation']} normalisation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
