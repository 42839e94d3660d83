"""The model-card panel and the threshold slider's help, as Markdown from `Pipeline.summary()`."""

from __future__ import annotations

from typing import Any




def threshold_info(min_tumour_area: float) -> str:
    """The slider's help: with a fused gate the classifier threshold is not the only way a slice is called tumour."""
    text = "A slice is called tumour when its tumour probability is at least this"
    if min_tumour_area > 0:
        text += f", or when the segmenter outlines at least {min_tumour_area:.2%} of it (the fused gate)"
    return text + "; the default is the checkpoints' operating point."


def model_card_markdown(summary: dict[str, Any]) -> str:
    """The model-card panel: per model its validation metrics (with the protocol they came from) and how it was made."""
    lines = []
    for name, info in summary.get("models", {}).items():
        prep = info.get("preprocessing") or {}
        sizes = info.get("split_sizes") or {}
        lines.append(f"**{name}** ({info.get('task')}): input {prep.get('image_size')} px, "
                     f"normalisation `{prep.get('normalisation')}`, backbone init `{info.get('backbone_init')}`, "
                     f"weights {info.get('dtype')}, threshold {_fmt(info.get('threshold'))}.")
        split = ", ".join(f"{k} {v}" for k, v in sizes.items())
        metrics = dict(info.get("metrics") or {})
        protocol = metrics.pop("protocol", None)
        lines.append(
            f"- Protocol: {protocol or _DEFAULT_PROTOCOL}" + (f" Patients per split: {split}." if split else "")
        )
        lines += [f"- {line}" for line in _metric_lines(metrics)] or ["- No validation metrics recorded."]
        lines.append("")
    settings = summary.get("pipeline") or {}
    if settings:
        lines.append("Pipeline: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in settings.items()) + ".")
    point = summary.get("operating_point") or {}
    lines.append(
        "Operating point from `pipeline.json`: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in point.items()) + "."
        if point else "No `pipeline.json`: thresholds are the checkpoints' own."
    )
    return "\n".join(lines)


_DEFAULT_PROTOCOL = (
    "validation patients of a patient-level split (no patient in both train and validation), at the epoch chosen on "
    "that same split, so slightly optimistic; the untouched test split is reported by `python -m flaxtumor.evaluate`."
)
# What each metric the training loop records means, so the numbers are not read as something they are not.
_METRIC_NOTES = {
    "volumetric_dice": "3D Dice per patient, mean over patients",
    "dice": "per slice, mean over slices with tumour in truth or prediction",
    "iou": "per slice, mean over slices with tumour in truth or prediction",
    "pooled_dice": "pixels of all slices pooled",
    "accuracy": "per slice, at the checkpoint threshold",
    "precision": "per slice, at the checkpoint threshold",
    "recall": "per slice, at the checkpoint threshold",
    "f1": "per slice, at the checkpoint threshold",
    "auc": "per-slice ROC AUC",
}


def _metric_lines(metrics: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            lines += _metric_lines(value, f"{prefix}{key} / ")
        elif isinstance(value, (int, float, str, bool)) or value is None:
            note = f" ({_METRIC_NOTES[key]})" if key in _METRIC_NOTES else ""
            lines.append(f"{prefix}{key}: {_fmt(value)}{note}")
    return lines


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
