"""What the viewers draw: the slice with the predicted mask filled at the chosen opacity, the true mask as an outline in
a distinct colour, the Grad-CAM blend, and a legend that lists only what is drawn on that slice.

Both are drawn on the server into one RGB image, so the prediction, the truth and the Grad-CAM images share one size
and one component type, and opacity or toggles need no model call (`flaxtumor.app.cache`).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import matplotlib
import numpy as np
from PIL import Image
from scipy import ndimage

PREDICTION_COLOUR = "#ff3b30"  # filled: the predicted tumour
TRUTH_COLOUR = "#00d8ff"  # outlined: the uploaded truth (cyan stays distinct from red for red-green colour blindness)
DEFAULT_OPACITY = 0.45
DISPLAY_SIDE = 384  # px: the viewers' height; smaller slices are drawn at this size so they fill it


@dataclass(frozen=True)
class Display:
    """How a slice is drawn: prediction opacity, and whether the prediction and the truth are shown."""

    opacity: float = DEFAULT_OPACITY
    prediction: bool = True
    truth: bool = True


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], np.float32)


def fit_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A bool mask at another (h, w), nearest neighbour (a thumbnail's size)."""
    if mask.shape == tuple(shape[:2]):
        return mask.astype(bool)
    h, w = shape[:2]
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 127


def for_display(image: np.ndarray, side: int = DISPLAY_SIDE) -> np.ndarray:
    """A slice (or a Grad-CAM blend) enlarged to `side` px when smaller (bilinear), so every viewer fills its frame
    and the masks drawn over it (at this size) stay crisp."""
    h, w = image.shape[:2]
    if max(h, w) >= side:
        return image
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def outline(mask: np.ndarray, width: int | None = None) -> np.ndarray:
    """The inner border of a bool mask, `width` px (default: 1 px per 160 px of side, at least 1)."""
    if not mask.any():
        return mask.astype(bool)
    width = width or max(1, round(max(mask.shape) / 160))
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def compose(image: np.ndarray, prediction: np.ndarray | None, truth: np.ndarray | None, display: Display) -> np.ndarray:
    """uint8 (h, w, 3): `image` (enlarged `for_display`) with the prediction filled at `display.opacity` and the
    truth outlined (both optional, both at any size: fitted to the image)."""
    image = for_display(image)
    out = image.astype(np.float32)
    if prediction is not None and display.prediction and display.opacity > 0:
        fill = fit_mask(prediction, image.shape)
        out[fill] = out[fill] * (1 - display.opacity) + _rgb(PREDICTION_COLOUR) * display.opacity
    if truth is not None and display.truth:
        out[outline(fit_mask(truth, image.shape))] = _rgb(TRUTH_COLOUR)
    return out.clip(0, 255).astype(np.uint8)


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Grad-CAM blended over the slice (jet colour map), uint8 (H, W, 3)."""
    colours = matplotlib.colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


def _chip(colour: str, text: str, filled: bool) -> str:
    style = f"background:{colour};" if filled else f"border:2px solid {colour};"
    return (f'<span class="legend-item"><span class="legend-chip" style="{style}"></span>'
            f"{html.escape(text)}</span>")


def legend_html(caption: str, prediction: np.ndarray | None, truth: np.ndarray | None, display: Display,
                has_truth: bool = False) -> str:
    """The caption above a viewer and the legend of what is drawn on this slice: a chip only for a layer that is
    shown and not empty. `has_truth`: the upload has truth, so a slice without a true tumour says so."""
    items = []
    if prediction is not None and prediction.any() and display.prediction and display.opacity > 0:
        items.append(_chip(PREDICTION_COLOUR, "predicted tumour", filled=True))
    if truth is not None and truth.any() and display.truth:
        items.append(_chip(TRUTH_COLOUR, "true tumour (outline)", filled=False))
    notes = []
    if prediction is not None and not prediction.any():
        notes.append("no tumour predicted on this slice")
    elif prediction is not None and not (display.prediction and display.opacity > 0):
        notes.append("prediction hidden")
    if has_truth and (truth is None or not truth.any()):
        notes.append("no true tumour on this slice" if truth is not None else "no truth for this slice")
    elif has_truth and not display.truth:
        notes.append("truth hidden")
    legend = "".join(items) + (f'<span class="legend-note">{html.escape("; ".join(notes))}</span>' if notes else "")
    return (f'<div class="viewer-caption">{html.escape(caption)}</div>'
            f'<div class="viewer-legend">{legend}</div>')
