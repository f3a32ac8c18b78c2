"""Classification metrics against scikit-learn, by hand, and the confusion-matrix PNG."""

import json
import warnings

import numpy as np
import pytest
from flaxpod.train.classification_metrics import (
    classification_report,
    colour_scale,
    confusion_matrix,
    confusion_png_geometry,
    format_table,
    summary_metrics,
    write_confusion_png,
)
from PIL import Image
from sklearn import metrics as sk
from sklearn.exceptions import UndefinedMetricWarning


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Predictions where some labels never occur in y_true and others are never predicted."""
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(4, 12))
    n = int(rng.integers(20, 300))
    # perm[0] is only predicted, perm[1] only true, perm[2] in neither; the rest in both.
    perm = rng.permutation(n_classes)
    true_classes = np.delete(perm, [0, 2])
    pred_classes = np.delete(perm, [1, 2])
    y_true = rng.choice(true_classes, size=n)
    y_true[0] = perm[1]  # at least one example of the never-predicted class
    # Partly right, so that the scores are not all near chance.
    right = (rng.random(n) < 0.5) & np.isin(y_true, pred_classes)
    y_pred = np.where(right, y_true, rng.choice(pred_classes, size=n))
    labels = [f"class_{i}" for i in range(n_classes)]
    return y_true, y_pred, labels


@pytest.mark.parametrize("seed", range(8))
def test_equals_scikit_learn_on_random_predictions(seed):
    y_true, y_pred, labels = _random_case(seed)
    ids = list(range(len(labels)))
    report = classification_report(y_true, y_pred, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, labels=ids, average=None)
        averages = {
            avg: sk.precision_recall_fscore_support(y_true, y_pred, labels=ids, average=avg)[:3]
            for avg in ("macro", "weighted")
        }
        sk_dict = sk.classification_report(y_true, y_pred, labels=ids, target_names=labels, output_dict=True)
        sk_text = sk.classification_report(y_true, y_pred, labels=ids, target_names=labels, digits=4)

    per_class = report["per_class"]
    assert list(per_class) == labels
    np.testing.assert_allclose([per_class[k]["precision"] for k in labels], p, rtol=1e-12, atol=0)
    np.testing.assert_allclose([per_class[k]["recall"] for k in labels], r, rtol=1e-12, atol=0)
    np.testing.assert_allclose([per_class[k]["f1"] for k in labels], f, rtol=1e-12, atol=0)
    assert [per_class[k]["support"] for k in labels] == s.tolist()
    for avg, values in averages.items():
        for score, value in zip(("precision", "recall", "f1"), values, strict=True):
            assert report[f"{avg}_{score}"] == pytest.approx(value, rel=1e-12, abs=0)
        assert report[f"{avg}_f1"] == pytest.approx(sk_dict[f"{avg} avg"]["f1-score"], rel=1e-12, abs=0)
    assert report["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred), rel=1e-12, abs=0)
    assert report["accuracy"] == pytest.approx(sk_dict["accuracy"], rel=1e-12, abs=0)
    assert report["examples"] == len(y_true)
    assert report["confusion_matrix"] == sk.confusion_matrix(y_true, y_pred, labels=ids).tolist()
    assert format_table(report) == sk_text.rstrip("\n")

    # The case covers what it claims: labels absent from y_true, never predicted, or both.
    predicted = np.bincount(y_pred, minlength=len(labels))
    assert (
        ((s == 0) & (predicted > 0)).any()
        and ((s > 0) & (predicted == 0)).any()
        and ((s == 0) & (predicted == 0)).any()
    )


def test_by_hand_with_a_label_nobody_uses():
    # true a a b c ; pred a b b b ; label d appears nowhere
    report = classification_report(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), ["a", "b", "c", "d"])
    assert report["confusion_matrix"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert report["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert report["per_class"]["b"] == {"precision": 1 / 3, "recall": 1.0, "f1": 0.5, "support": 1}
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["accuracy"] == 0.5
    # Macro counts d: (1 + 1/3 + 0 + 0) / 4; weighted by support 2, 1, 1, 0.
    assert report["macro_precision"] == pytest.approx(1 / 3)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 4)
    assert report["weighted_recall"] == pytest.approx((2 * 0.5 + 1.0) / 4)
    assert summary_metrics(report) == {
        k: report[k]
        for k in (
            "accuracy",
            "macro_precision",
            "macro_recall",
            "macro_f1",
            "weighted_precision",
            "weighted_recall",
            "weighted_f1",
        )
    }
    assert json.loads(json.dumps(report)) == report  # JSON-able, nothing lost


def test_bad_ids_are_refused():
    with pytest.raises(ValueError, match="no examples"):
        classification_report(np.array([], int), np.array([], int), ["a", "b"])
    with pytest.raises(ValueError, match=r"y_pred: label ids must be in \[0, 2\)"):
        classification_report(np.array([0, 1]), np.array([0, 2]), ["a", "b"])
    with pytest.raises(ValueError, match="y_true"):
        confusion_matrix(np.array([-1, 1]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="one length"):
        confusion_matrix(np.array([0, 1]), np.array([0]), 2)


def _cell_luminance(png: Image.Image, n_classes: int) -> np.ndarray:
    """Luminance of each cell, read 2 pixels inside its top-left corner (away from the count text)."""
    left, top, cell = confusion_png_geometry(n_classes)
    grey = np.asarray(png.convert("L"), np.float64)
    rows = top + np.arange(n_classes) * cell + 2
    cols = left + np.arange(n_classes) * cell + 2
    return grey[np.ix_(rows, cols)]


@pytest.mark.parametrize("n_classes", [4, 77])
def test_confusion_png_decodes_and_is_brightest_at_the_largest_count(tmp_path, n_classes):
    rng = np.random.default_rng(n_classes)
    y_true = rng.integers(0, n_classes, 40 * n_classes)
    y_pred = np.where(rng.random(len(y_true)) < 0.6, y_true, rng.integers(0, n_classes, len(y_true)))
    y_true = np.append(y_true, [1] * 50)  # one count far above the rest: (1, 2)
    y_pred = np.append(y_pred, [2] * 50)
    labels = [f"intent_{i}" for i in range(n_classes)]
    report = classification_report(y_true, y_pred, labels)
    path = tmp_path / "eval" / "confusion.png"
    write_confusion_png(report, path, title="test")

    png = Image.open(path)
    png.load()
    assert png.format == "PNG" and png.mode == "RGB"
    left, top, cell = confusion_png_geometry(n_classes)
    assert png.size == (left + n_classes * cell, top + n_classes * cell)
    if n_classes == 77:
        assert (left, top, cell) == (0, 24, 10)  # 800 // 77: the grid spans about 800 pixels
    luminance = _cell_luminance(png, n_classes)
    counts = np.asarray(report["confusion_matrix"])
    assert np.unravel_index(np.argmax(luminance), luminance.shape) == (1, 2)
    # Brightness never falls as the count rises.
    order = np.argsort(counts, axis=None, kind="stable")
    assert (np.diff(luminance.ravel()[order]) >= -1).all()


def test_colour_scale_ends_and_monotone_luminance():
    ends = colour_scale(np.array([0.0, 1.0]))
    assert ends.tolist() == [[68, 1, 84], [253, 231, 37]]  # viridis' first and last colours
    luminance = colour_scale(np.linspace(0, 1, 101)) @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(luminance) > 0).all()
