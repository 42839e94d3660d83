"""The model-card panel as Markdown tables, and the threshold slider's and classifier gate's help, from
`Pipeline.summary()` and the operating point.

Everything is read generically from the summary (the checkpoints' metadata and `pipeline.json` as recorded), so a
retrained model or a re-tuned `pipeline.json` shows up without code changes: the operating point, how it was chosen
(`tuned_on`), its validation metrics (`validation`) and ablation (`ablation`), any other record, then per model its
preprocessing, split and validation metrics with the protocol they came from.

Settings are shown exactly as stored (0.0005 stays 0.0005); metrics to three decimals, like the model card.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flaxtumor.operating_point import OperatingPoint

_POINT_FIELDS = (*OperatingPoint.__dataclass_fields__, "lcc")
# What each operating-point field does, in words (a field the code gains later is shown without a meaning).
_POINT_MEANINGS = {
    "threshold": "the classifier flags a slice when its tumour probability is at least this",
    "min_tumour_area": "fused gate: a slice is also flagged when the segmenter outlines at least this fraction of it",
    "mask_threshold": "the segmenter's per-pixel probability for a tumour pixel",
    "postprocess": "rule run over each patient's gated masks",
    "lcc": "keep only the largest 3D connected component (the post-processing rule)",
    "tta": "average each model over the image and its horizontal flip",
    "gate": "empty the masks of slices that are not flagged",
    "flag_threshold": "a slice with nothing outlined is called suspicious when its tumour probability is at least "
                      "this (the classifier's own threshold; the gate's threshold above is tuned for Dice)",
}
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
_LIST_SHOWN = 8  # longer lists are abbreviated: first three, last, and the count


def classifier_off_rule(min_tumour_area: float, gate: bool = True) -> str:
    """What calls a slice tumour when the classifier is off (it flags no slice), in words."""
    if not gate:
        return "no gate empties a mask, so a slice is called tumour wherever the segmenter outlines a region"
    if min_tumour_area > 0:
        return (f"a slice is called tumour only when the segmenter outlines at least {min_tumour_area:.2%} of it "
                "(the fused gate)")
    return "without a fused gate every mask is emptied, so no slice is called tumour"


def threshold_info(min_tumour_area: float, classifier_on: bool = True, gate: bool = True,
                   flag_threshold: float | None = None) -> str:
    """The slider's help: with a fused gate the classifier threshold is not the only way a slice is called tumour;
    when the checkpoints' point has the classifier off, it says so and what calls a slice tumour instead; with a
    flag threshold of its own, that the slider does not move the suspicious flags."""
    if not classifier_on:
        return (f"The checkpoints' operating point has the classifier off: it flags no slice, and "
                f"{classifier_off_rule(min_tumour_area, gate)}. Tick “Classifier gate” to also call a slice tumour "
                "when its tumour probability is at least this.")
    text = "A slice is called tumour when its tumour probability is at least this"
    if min_tumour_area > 0:
        text += f", or when the segmenter outlines at least {min_tumour_area:.2%} of it (the fused gate)"
    text += "; the default is the checkpoints' operating point."
    if flag_threshold is not None:
        text += (f" A slice with nothing outlined is flagged suspicious at a tumour probability of {flag_threshold:.2f}"
                 " (the classifier's own threshold), whatever this says.")
    return text


def classifier_info(min_tumour_area: float, gate: bool = True) -> str:
    """The classifier gate's help: what each state does."""
    return (f"Ticked: the threshold below applies. Unticked: the classifier flags no slice, and "
            f"{classifier_off_rule(min_tumour_area, gate)}.")


def model_card_markdown(summary: dict[str, Any]) -> str:
    """The model-card panel: the operating point and its record, then per model its metrics and how it was made."""
    record = dict(summary.get("operating_point") or {})
    parts = [_point_section(summary.get("pipeline") or {}, record)]
    shown = set(_POINT_FIELDS)
    if isinstance(record.get("tuned_on"), dict):
        tuned_on, candidates = _split_rows(record["tuned_on"], "candidates")
        parts.append("**How the operating point was chosen**\n\n" + _key_value_table(tuned_on))
        if candidates:
            parts.append(_scored_table(f"**The {len(candidates)} candidates searched**", candidates))
        shown.add("tuned_on")
    if isinstance(record.get("validation"), dict):
        parts.append(_validation_section(record["validation"], record.get("tuned_on")))
        shown.add("validation")
    if isinstance(record.get("ablation"), list) and record["ablation"]:
        parts.append(_scored_table("**Ablation** (each variant of the pipeline scored like the validation above)",
                                   record["ablation"]))
        shown.add("ablation")
    if isinstance(record.get("classifier_gate"), dict):  # python -m flaxtumor.classifier_gate
        parts.append(_gate_section(record["classifier_gate"]))
        shown.add("classifier_gate")
    others = {k: v for k, v in record.items() if k not in shown}  # whatever else a new pipeline.json records
    if others:
        parts.append("**Other records in `pipeline.json`**\n\n" + _key_value_table(others))
    parts.append(_models_section(summary.get("models") or {}))
    return "\n\n".join(parts)


# -- sections ----------------------------------------------------------------------------------------------------------


def _point_section(point: dict[str, Any], record: dict[str, Any]) -> str:
    source = ("from `pipeline.json`" if record else
              "no `pipeline.json`: the checkpoints' own thresholds, no post-processing")
    rows = [f"| `{k}` | {_setting(k, v)} | {_POINT_MEANINGS.get(k, '')} |" for k, v in point.items()]
    text = (f"**Operating point** (the app's defaults; {source})\n\n| setting | value | what it does |\n|---|---|---|\n"
            + "\n".join(rows))
    if "threshold" in point and _is_off(point["threshold"]):
        area = point.get("min_tumour_area")
        area = float(area) if isinstance(area, (int, float)) and not isinstance(area, bool) else 0.0
        text += (f"\n\n**The classifier is off** at this operating point: it flags no slice, and "
                 f"{classifier_off_rule(area, point.get('gate') is not False)}. Its tumour probabilities are still "
                 "shown; tick “Classifier gate” to apply a threshold to them.")
    return text


def _validation_section(validation: dict[str, Any], tuned_on: Any) -> str:
    protocol = "the whole pipeline at this operating point"
    if isinstance(tuned_on, dict):
        patients = tuned_on.get("patients")
        if isinstance(patients, list):
            protocol += f", on the {len(patients)} patients it was tuned on"
        if tuned_on.get("split"):
            protocol += f" ({_text(tuned_on['split'])})"
        if tuned_on.get("note"):
            protocol += f"; {_text(tuned_on['note'])}"
    rows = [f"| {_text(k)} | {_metric(v)} |" for k, v in _flat(validation)]
    return (f"**Validation** ({protocol})\n\n| metric | value |\n|---|---|\n" + "\n".join(rows))


def _split_rows(d: dict[str, Any], key: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(`d` without `key`, the rows under `key`) when `key` holds a list of records; else (`d`, [])."""
    rows = d.get(key)
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        return {k: v for k, v in d.items() if k != key}, rows
    return d, []


def _gate_section(gate: dict[str, Any]) -> str:
    """classifier_gate's record: how it was decided, then every candidate scored, the chosen one named."""
    facts, candidates = _split_rows(gate, "candidates")
    chosen = facts.pop("chosen", None)
    rows = [{"name": "chosen" if c == chosen else "", **c} for c in candidates]
    text = ("**The classifier gate** (decided on patients that neither model trained on)\n\n"
            + _key_value_table(facts))
    return text + ("\n\n" + _scored_table("Candidates, scored on those patients", rows) if rows else "")


def _scored_table(title: str, entries: list[Any]) -> str:
    """Records (operating-point settings and scores) as one table; a record's `name` labels its row."""
    entries = [e for e in entries if isinstance(e, dict)]
    columns = [k for k in dict.fromkeys(k for e in entries for k in e) if k != "name"]
    settings = [k for k in columns if k in _POINT_FIELDS]
    scores = [k for k in columns if k not in _POINT_FIELDS]
    # Metric names with spaces, so narrow columns wrap between words.
    head = "| variant | " + " | ".join([*(f"`{k}`" for k in settings), *(_text(k.replace("_", " ")) for k in scores)])
    head += " |"
    rows = []
    for e in entries:
        cells = [_setting(k, e.get(k)) if k in e else "" for k in settings]
        cells += [_metric(e[k]) if k in e else "" for k in scores]
        rows.append(f"| {_text(e.get('name', ''))} | " + " | ".join(cells) + " |")
    return f"{title}\n\n" + head + "\n|" + "---|" * (1 + len(columns)) + "\n" + "\n".join(rows)


def _models_section(models: dict[str, Any]) -> str:
    parts = []
    for name, info in models.items():
        prep = info.get("preprocessing") or {}
        sizes = {k: v for k, v in (info.get("split_sizes") or {}).items()}
        facts = {"task": info.get("task"), "input size (px)": prep.get("image_size"),
                 "normalisation": prep.get("normalisation"), "backbone init": info.get("backbone_init"),
                 "weights": info.get("dtype"), "checkpoint threshold": info.get("threshold"),
                 "patients per split": ", ".join(f"{k} {v}" for k, v in sizes.items()) or None}
        ensemble = info.get("ensemble")
        if isinstance(ensemble, dict) and isinstance(ensemble.get("members"), list):
            what = ensemble.get("describe") or f"{len(ensemble['members'])} fold models"  # older folders: folds
            facts["ensemble"] = f"{what}; {ensemble.get('combine')}"
        if info.get("source"):
            facts["loaded from"] = "/".join(Path(str(info["source"])).parts[-2:])
        metrics = dict(info.get("metrics") or {})
        protocol = metrics.pop("protocol", None) or _default_protocol(sizes)
        rows = [f"| {_text(k)} | {_metric(v)} | {_METRIC_NOTES.get(k.rsplit(' / ', 1)[-1], '')} |"
                for k, v in _flat(metrics)]
        table = ("| metric | value | meaning |\n|---|---|---|\n" + "\n".join(rows)) if rows else \
            "No validation metrics recorded."
        parts.append(f"**{_text(name)}**\n\n" + _key_value_table({k: v for k, v in facts.items() if v is not None})
                     + f"\n\nValidation metrics. Protocol: {_text(protocol)}\n\n{table}")
    return "\n\n".join(parts)


def _default_protocol(split_sizes: dict[str, Any]) -> str:
    text = ("validation patients of a patient-level split (no patient in both train and validation), at the epoch "
            "chosen on that same split, so slightly optimistic")
    if split_sizes.get("test"):
        return text + "; the untouched test split is reported by `python -m flaxtumor.evaluate`."
    return text + "; this split has no test patients, so there is no held-out test score."


# -- cells ---------------------------------------------------------------------------------------------------------


def _key_value_table(d: dict[str, Any]) -> str:
    rows = [f"| {_text(k)} | {_cell(v)} |" for k, v in _flat(d, keep_lists=True)]
    return "| | |\n|---|---|\n" + "\n".join(rows)


def _flat(d: dict[str, Any], prefix: str = "", keep_lists: bool = False) -> list[tuple[str, Any]]:
    """(key path, leaf) pairs; nested dicts become `outer / inner` rows instead of a printed dict."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k} / ", keep_lists)
        elif keep_lists or not isinstance(v, list):
            out.append((f"{prefix}{k}", v))
    return out


def _is_off(threshold: Any) -> bool:
    """A threshold that means the classifier is off: inf, or null as `pipeline.json` stores it."""
    return threshold is None or (isinstance(threshold, float) and math.isinf(threshold))


def _setting(key: str, value: Any) -> str:
    """An operating-point value exactly as stored; a missing threshold (stored as null) is the classifier off."""
    if key == "threshold" and _is_off(value):
        return "∞ (classifier off)"
    return _cell(value)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # the shortest exact form: 0.0005, not 0.001
    if isinstance(value, list):
        shown = [_cell(v) for v in value]
        if len(shown) > _LIST_SHOWN:
            return f"{', '.join(shown[:3])}, …, {shown[-1]} ({len(value)} in all)"
        return ", ".join(shown)
    if isinstance(value, dict):
        return "; ".join(f"{_text(k)}: {_cell(v)}" for k, v in value.items())
    if value is None:
        return "–"
    return _text(value)


def _metric(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _cell(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return "–"
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.001 else f"{value:.3g}"


def _text(value: Any) -> str:
    """Plain text for a Markdown table cell: no line breaks, pipes escaped."""
    return str(value).replace("\r", " ").replace("\n", " ").replace("|", "\\|")
