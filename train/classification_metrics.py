"""Classification metrics from true and predicted label ids, in numpy: accuracy, precision,
recall and F1 per class and averaged, the confusion matrix, a terminal table and a PNG heat map.

Conventions are scikit-learn's defaults (`precision_recall_fscore_support`,
`classification_report`, `confusion_matrix`, tests check equality): every label of the
label set counts, including one never predicted or absent from y_true; a ratio whose
denominator is 0 is 0 (`zero_division="warn"`, without the warning); F1 is
2 tp / (2 tp + fp + fn); macro averages are unweighted means over the labels, weighted ones
weight each label by its support (its count in y_true). The confusion matrix has true labels
as rows and predicted labels as columns. Written here rather than imported because
scikit-learn is a test-only dependency: the trainer should not pull in scipy and joblib for
a few bincounts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

AVERAGES = ("macro", "weighted")
SCORES = ("precision", "recall", "f1")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """int64 [n_classes, n_classes]: entry [t, p] counts examples of label t predicted as p."""
    y_true, y_pred = _check_ids(y_true, y_pred, n_classes)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _check_ids(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(
            f"y_true and y_pred: expected two 1-d arrays of one length, got {y_true.shape}, {y_pred.shape}"
        )
    if y_true.size == 0:
        raise ValueError("classification metrics: no examples")
    for name, ids in (("y_true", y_true), ("y_pred", y_pred)):
        if ids.min() < 0 or ids.max() >= n_classes:
            raise ValueError(f"{name}: label ids must be in [0, {n_classes}), got {ids.min()}..{ids.max()}")
    return y_true, y_pred


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division)."""
    out = np.zeros(len(numerator), np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """A JSON-able report of predictions `y_pred` against `y_true` (label ids into `labels`).

    Keys: examples, accuracy, macro_precision, macro_recall, macro_f1, weighted_precision,
    weighted_recall, weighted_f1 (floats; flat so that any can be an early-stopping metric),
    labels, per_class ({label: {precision, recall, f1, support}}, in label order) and
    confusion_matrix (a list of rows; rows true, columns predicted).
    """
    labels = list(labels)
    matrix = confusion_matrix(y_true, y_pred, len(labels))
    tp = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    per_class = {
        "precision": _divide(tp, predicted),
        "recall": _divide(tp, support),
        "f1": _divide(2 * tp, support + predicted),
    }
    report: dict[str, Any] = {"examples": int(support.sum()), "accuracy": float(tp.sum() / support.sum())}
    for score in SCORES:
        report[f"macro_{score}"] = float(np.mean(per_class[score]))
        report[f"weighted_{score}"] = float(np.average(per_class[score], weights=support))
    report["labels"] = labels
    report["per_class"] = {
        label: {**{score: float(per_class[score][i]) for score in SCORES}, "support": int(support[i])}
        for i, label in enumerate(labels)
    }
    report["confusion_matrix"] = matrix.tolist()
    return report


def summary_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's scalar metrics (accuracy and the averages), e.g. for metrics.jsonl."""
    keys = ["accuracy"] + [f"{avg}_{score}" for avg in AVERAGES for score in SCORES]
    return {key: report[key] for key in keys}


def format_table(report: dict[str, Any], digits: int = 4) -> str:
    """The report as a terminal table: scikit-learn's `classification_report` text, character
    for character (without its final newline)."""
    width = max(len("weighted avg"), digits, *(len(label) for label in report["labels"]))
    row = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}"
    lines = [("{:>{width}s} " + " {:>9}" * 4).format("", "precision", "recall", "f1-score", "support", width=width), ""]
    for label, scores in report["per_class"].items():
        values = [scores[score] for score in SCORES]
        lines.append(row.format(label, *values, scores["support"], width=width, digits=digits))
    lines.append("")
    accuracy = "{:>{width}s} " + " {:>9}" * 2 + " {:>9.{digits}f} {:>9}"
    lines.append(
        accuracy.format("accuracy", "", "", report["accuracy"], report["examples"], width=width, digits=digits)
    )
    for avg in AVERAGES:
        values = [report[f"{avg}_{score}"] for score in SCORES]
        lines.append(row.format(f"{avg} avg", *values, report["examples"], width=width, digits=digits))
    return "\n".join(lines)


# ---------------------------------------------------------------- heat map

# Five stops of matplotlib's viridis: perceptually even and growing brighter with the count,
# so the brightest cell is the largest count (also in greyscale).
VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)
LABELLED_MAX_CLASSES = 20  # up to this many classes, cells show counts and axes show label names
LABELLED_CELL_PX = 40
GRID_PX = 800  # without labels, cells are max(MIN_CELL_PX, GRID_PX // n_classes) pixels
MIN_CELL_PX = 4
TITLE_PX = 24  # title band above everything
NAME_PX = 140  # band for label names left of the rows and above the columns (labelled layout)
FONT_PX = 12


def colour_scale(values: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] for values in [0, 1] along the viridis stops."""
    x = np.clip(np.asarray(values, np.float64), 0, 1) * (len(VIRIDIS) - 1)
    low = np.minimum(np.floor(x).astype(int), len(VIRIDIS) - 2)
    frac = (x - low)[..., None]
    return np.rint(VIRIDIS[low] * (1 - frac) + VIRIDIS[low + 1] * frac).astype(np.uint8)


def confusion_png_geometry(n_classes: int) -> tuple[int, int, int]:
    """(left, top, cell): the grid's top-left corner and cell size in pixels.

    The image is (top + n * cell) high and (left + n * cell) wide, or as wide as its title
    line when that is wider.
    """
    if n_classes <= LABELLED_MAX_CLASSES:
        return NAME_PX, TITLE_PX + NAME_PX, LABELLED_CELL_PX
    return 0, TITLE_PX, max(MIN_CELL_PX, GRID_PX // n_classes)


def write_confusion_png(report: dict[str, Any], path: str | Path, title: str = "confusion matrix") -> None:
    """A heat map of the report's confusion matrix (rows true, columns predicted) as a PNG.

    Colour is the count over the largest count, on the viridis scale (dark to bright). Up to
    LABELLED_MAX_CLASSES classes, each cell shows its count and the axes the label names
    (columns' names read upwards); beyond that, only the cells and the title.
    """
    matrix = np.asarray(report["confusion_matrix"], np.int64)
    labels = report["labels"]
    n = len(labels)
    left, top, cell = confusion_png_geometry(n)
    scale = colour_scale(matrix / max(int(matrix.max()), 1))
    # One pixel per cell, scaled up with NEAREST: exact cell edges at any size, in one call.
    grid = Image.fromarray(scale, "RGB").resize((n * cell, n * cell), Image.Resampling.NEAREST)
    font = ImageFont.load_default(size=FONT_PX)
    heading = f"{title} (max count {matrix.max()})"
    width = max(left + n * cell, math.ceil(font.getlength(heading)) + 8)
    image = Image.new("RGB", (width, top + n * cell), "white")
    image.paste(grid, (left, top))
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), heading, fill="black", font=font)
    if n <= LABELLED_MAX_CLASSES:
        draw.multiline_text((4, TITLE_PX + 4), "rows: true\ncolumns: predicted", fill="black", font=font)
        _draw_counts(draw, matrix, scale, left, top, cell, font)
        _draw_names(image, labels, left, top, cell, font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)


def _draw_counts(draw: ImageDraw.ImageDraw, matrix: np.ndarray, scale: np.ndarray, left, top, cell, font) -> None:
    for (t, p), count in np.ndenumerate(matrix):
        # Dark text on the bright end of the scale, white on the dark end.
        luminance = scale[t, p] @ np.array([0.299, 0.587, 0.114])
        centre = (left + p * cell + cell / 2, top + t * cell + cell / 2)
        draw.text(centre, str(count), fill="black" if luminance > 128 else "white", font=font, anchor="mm")


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _draw_names(image: Image.Image, labels: Sequence[str], left: int, top: int, cell: int, font) -> None:
    draw = ImageDraw.Draw(image)
    for i, label in enumerate(labels):
        name = _fit(draw, label, font, NAME_PX - 8)
        draw.text((left - 4, top + i * cell + cell / 2), name, fill="black", font=font, anchor="rm")
        # Column names read upwards: drawn on a strip, rotated, pasted above the column.
        strip = Image.new("RGB", (NAME_PX, cell), "white")
        ImageDraw.Draw(strip).text((4, cell / 2), name, fill="black", font=font, anchor="lm")
        image.paste(strip.rotate(90, expand=True), (left + i * cell, top - NAME_PX))
