"""Evaluation figures (matplotlib, Agg backend: runs headless and in CI)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


@dataclass(frozen=True)
class GalleryItem:
    title: str
    image: np.ndarray  # uint8 (H, W, 3)
    target: np.ndarray  # bool (H, W)
    pred: np.ndarray  # bool (H, W)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix(matrix: Sequence[Sequence[int]], path: Path) -> Path:
    """[[tn, fp], [fn, tp]], rows truth and columns prediction."""
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(m, cmap="Blues")
    for (r, c), v in np.ndenumerate(m):
        ax.text(c, r, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black", fontsize=13)
    ax.set_xticks([0, 1], ["no tumour", "tumour"])
    ax.set_yticks([0, 1], ["no tumour", "tumour"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title("Classifier confusion matrix (slices)")
    return _save(fig, path)


def roc(fpr: np.ndarray, tpr: np.ndarray, auc: float, operating_point: tuple[float, float], path: Path) -> Path:
    """ROC curve with the chosen threshold's (1 - specificity, sensitivity) marked."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.4f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot(*operating_point, "o", color="crimson", label="threshold")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("Classifier ROC (slices)")
    ax.legend(loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    return _save(fig, path)


def reliability(calibration: Mapping, path: Path) -> Path:
    """Observed tumour frequency against mean predicted probability per bin, bar widths the bins."""
    edges = np.asarray(calibration["bin_edges"])
    conf = np.asarray(calibration["bin_confidence"], dtype=float)
    freq = np.asarray(calibration["bin_frequency"], dtype=float)
    counts = np.asarray(calibration["bin_counts"])
    filled = counts > 0
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.bar(edges[:-1][filled], freq[filled], width=np.diff(edges)[filled], align="edge", edgecolor="k", alpha=0.7,
           label="observed frequency")
    ax.plot(conf[filled], freq[filled], "o", color="crimson", label="bin mean probability")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set_xlabel("predicted tumour probability")
    ax.set_ylabel("fraction of tumour slices")
    ax.set_title(f"Reliability (ECE = {calibration['ece']:.4f})")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    return _save(fig, path)


def patient_dice(per_patient: Mapping[str, float], path: Path) -> Path:
    """One bar per patient (sorted); patients with no tumour in truth or prediction are marked n/a, not scored."""
    items = sorted(per_patient.items(), key=lambda kv: (np.isnan(kv[1]), kv[1] if not np.isnan(kv[1]) else 0))
    names = [pid for pid, _ in items]
    values = np.array([v for _, v in items], dtype=float)
    scored = values[~np.isnan(values)]
    fig, ax = plt.subplots(figsize=(max(5, 0.28 * len(items) + 2), 4))
    ax.bar(range(len(items)), np.nan_to_num(values), color=["tab:blue" if not np.isnan(v) else "white" for v in values],
           edgecolor="k")
    for i, v in enumerate(values):
        if np.isnan(v):
            ax.text(i, 0.02, "n/a", ha="center", va="bottom", rotation=90, fontsize=7)
    if scored.size:
        ax.axhline(scored.mean(), color="crimson", ls="--", lw=1, label=f"mean {scored.mean():.3f}")
        ax.axhline(np.median(scored), color="tab:green", ls=":", lw=1, label=f"median {np.median(scored):.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(range(len(items)), names, rotation=90, fontsize=6)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("volumetric Dice")
    ax.set_title("Pipeline per-patient Dice")
    return _save(fig, path)


def gallery(items: Sequence[GalleryItem], path: Path, columns: int = 4) -> Path:
    """Slices with the truth outlined in green and the prediction filled in red."""
    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, item in zip(axes.ravel(), items):
        ax.imshow(item.image)
        ax.imshow(np.ma.masked_where(~item.pred, item.pred), cmap="autumn", alpha=0.45, interpolation="nearest")
        if item.target.any():
            ax.contour(item.target.astype(float), levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(item.title, fontsize=7)
    fig.suptitle("green: truth outline, red: prediction")
    return _save(fig, path)


def training_curves(history: Sequence[Mapping], path: Path) -> Path:
    """Training loss and every validation metric per epoch (the run's metrics.jsonl rows)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    x = [h["global_epoch"] for h in history]
    a.plot(x, [h["train_loss"] for h in history], marker="o")
    a.set(title="train loss", xlabel="epoch")
    keys = [k for k in history[-1] if k.startswith("val_")]
    for k in keys:
        b.plot(x, [h.get(k) for h in history], marker="o", label=k[4:])
    b.set(title="validation" if keys else "no validation (--fold all: no held-out patients)", xlabel="epoch")
    if keys:
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
