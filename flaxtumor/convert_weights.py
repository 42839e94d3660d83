"""Convert ImageNet ResNet50 weights once into the directory `train.py --backbone-weights DST` and
`flaxtumor.models.load_resnet50(DST)` load.

    python -m flaxtumor.convert_weights resnet50.pth            converted/resnet50-tv
    python -m flaxtumor.convert_weights resnet50.safetensors    converted/resnet50-timm
    python -m flaxtumor.convert_weights resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5  converted/resnet50-keras
    python -m flaxtumor.convert_weights runs/pretrain/segmenter weights/indomain   # a trained ResNet50-UNet's encoder

The last form is in-domain pretraining: the encoder of a `--segmenter resnet50_unet` checkpoint, trained on the tumour
masks, becomes backbone weights; metadata.json records its preprocessing, image size and training patients.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flaxtumor.models.weights import METADATA_FILE, WeightsError, convert_source, export_encoder, save_converted


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
    parser.add_argument("src", type=Path, help="source weights: .pth/.pt/.bin (needs torch), .safetensors or .h5; "
                        "or an exported resnet50_unet segmenter checkpoint folder (its encoder is taken)")
    parser.add_argument("dst", type=Path, help="output directory (created)")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it already holds converted weights")
    args = parser.parse_args(argv)
    if (args.dst / METADATA_FILE).exists() and not args.force:
        print(f"error: {args.dst} already holds converted weights (use --force to overwrite)", file=sys.stderr)
        return 1
    if args.src.is_dir():
        return _export_pretrained_encoder(args.src, args.dst)
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


def _export_pretrained_encoder(src: Path, dst: Path) -> int:
    """The encoder of an exported ResNet50-UNet segmenter checkpoint, as backbone weights with its provenance."""
    from flaxtumor.models import ResNetUNet
    from flaxtumor.checkpoints import CheckpointError, load_inference

    try:
        model, meta = load_inference(src)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not isinstance(model, ResNetUNet):
        print(f"error: {src}: not a resnet50_unet segmenter checkpoint (segmenter "
              f"{meta.config.model.segmenter!r}); only its ResNet50 encoder can become backbone weights",
              file=sys.stderr)
        return 1
    split = meta.split or {}
    provenance = {
        "source": f"in-domain segmentation pretraining: encoder of {src.resolve()}",
        "normalisation": meta.preprocessing.normalisation,
        "image_size": meta.preprocessing.image_size,
        # The patients whose slices reached training batches (the leakage guard's record), else the split's.
        "patients": sorted(meta.extra.get("trained_patients") or split["train"]),
        "validation_patients": sorted(split.get("val", [])),
        "pretraining_metrics": meta.metrics,
    }
    export_encoder(model.encoder, dst, provenance)
    print(f"{dst}: {'ResNet50' if model.encoder.stage_sizes == (3, 4, 6, 3) else 'tiny ResNet'} encoder of {src} ({len(provenance['patients'])} training patients); expects "
          f"{provenance['normalisation']} normalisation at {provenance['image_size']}x{provenance['image_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
