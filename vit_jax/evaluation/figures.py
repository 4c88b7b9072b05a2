"""The evaluation report's figures, drawn with matplotlib and saved as PNG files.

Figures are built with `matplotlib.figure.Figure` and the Agg canvas, never through pyplot, so
drawing them changes no global backend in the process (the training loop may call this).
"""

from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn import metrics as skm

# Past this many classes a confusion grid is unreadable: the ranked confusions replace it.
MAX_GRID_CLASSES = 30
# ROC curves are labelled one by one up to this many classes; past it, grey lines and the mean.
MAX_LABELLED_CURVES = 10
_DPI = 100


def _figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str) -> str:
  fig.savefig(path, format="png")
  return path


def _matrix_axes(
  ax: Any, matrix: np.ndarray, class_names: Sequence[str], title: str, fmt: str
) -> None:
  n = len(class_names)
  image = ax.imshow(matrix, cmap="Blues", vmin=0)
  ax.figure.colorbar(image, ax=ax, shrink=0.8)
  ax.set(title=title, xlabel="predicted", ylabel="true", xticks=range(n), yticks=range(n))
  ax.set_xticklabels(class_names, rotation=90 if n > 4 else 0, fontsize=8)
  ax.set_yticklabels(class_names, fontsize=8)
  if n <= 15:  # numbers in the cells while they still fit
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
      ax.text(
        j,
        i,
        format(value, fmt),
        ha="center",
        va="center",
        fontsize=8,
        color="white" if value > threshold else "black",
      )


def confusion_matrix(
  confusion: np.ndarray,
  class_names: Sequence[str],
  top_confusions: Sequence[dict[str, Any]],
  path: str,
) -> str:
  """Counts and row-normalised grids; past MAX_GRID_CLASSES classes, the ranked confusions."""
  confusion = np.asarray(confusion)
  n = len(class_names)
  if n > MAX_GRID_CLASSES:
    rows = list(top_confusions)
    fig = _figure(8, 1 + 0.3 * max(len(rows), 1))
    ax = fig.add_subplot()
    ax.barh(range(len(rows)), [r["count"] for r in rows], color="tab:red")
    ax.set_yticks(
      range(len(rows)),
      [f"{r['true']} \N{RIGHTWARDS ARROW} {r['predicted']}" for r in rows],
      fontsize=8,
    )
    ax.invert_yaxis()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
      xlabel="test examples",
      title=f"Most frequent confusions (true \N{RIGHTWARDS ARROW} predicted), {n} classes",
    )
    return _save(fig, path)
  support = confusion.sum(axis=1, keepdims=True)
  normalised = confusion / np.maximum(support, 1)
  side = max(4.0, 0.35 * n + 2)
  fig = _figure(2 * side + 2, side)
  count_ax, norm_ax = fig.subplots(1, 2)
  _matrix_axes(count_ax, confusion, class_names, "Confusion matrix (counts)", "d")
  _matrix_axes(norm_ax, normalised, class_names, "Row-normalised (diagonal: recall)", ".2f")
  return _save(fig, path)


def roc_curves(
  labels: np.ndarray,
  probs: np.ndarray,
  class_names: Sequence[str],
  auc_per_class: dict[str, Optional[float]],
  path: str,
) -> str:
  """One-vs-rest ROC curve per class (classes absent from the split are left out)."""
  fig = _figure(6, 5)
  ax = fig.add_subplot()
  labelled = len(class_names) <= MAX_LABELLED_CURVES
  for c, name in enumerate(class_names):
    if auc_per_class.get(name) is None:
      continue
    fpr, tpr, _ = skm.roc_curve(labels == c, probs[:, c])
    if labelled:
      ax.plot(fpr, tpr, label=f"{name} (AUC {auc_per_class[name]:.3f})")
    else:
      ax.plot(fpr, tpr, color="grey", alpha=0.3, linewidth=0.8)
  if not labelled:
    fpr, tpr, _ = skm.roc_curve(np.eye(len(class_names))[labels].ravel(), probs.ravel())
    ax.plot(fpr, tpr, color="tab:blue", linewidth=2, label="micro-average (all classes)")
  ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
  ax.set(
    xlabel="false positive rate",
    ylabel="true positive rate",
    xlim=(0, 1),
    ylim=(0, 1.01),
    title="ROC curves, one class vs the rest",
  )
  ax.legend(loc="lower right", fontsize=8)
  return _save(fig, path)


def reliability_diagram(bins: dict[str, np.ndarray], ece: float, path: str) -> str:
  """Accuracy against confidence per bin, above a histogram of the confidences."""
  fig = _figure(6, 6)
  top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  edges, count = bins["edges"], bins["count"]
  centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
  seen = count > 0
  top.bar(
    centres[seen],
    bins["accuracy"][seen],
    width=width,
    edgecolor="black",
    color="tab:blue",
    label="accuracy",
  )
  accuracy, confidence = bins["accuracy"][seen], bins["confidence"][seen]
  top.bar(
    centres[seen],
    np.abs(confidence - accuracy),
    bottom=np.minimum(accuracy, confidence),
    width=width,
    color="tab:red",
    alpha=0.3,
    edgecolor="tab:red",
    label="gap to the mean confidence",
  )
  top.plot([0, 1], [0, 1], "k:", linewidth=0.8)
  top.set(
    ylabel="accuracy", ylim=(0, 1), title=f"Reliability diagram (ECE {ece:.4f}, {len(count)} bins)"
  )
  top.legend(loc="upper left", fontsize=8)
  bottom.bar(centres, count, width=width, edgecolor="black", color="grey")
  bottom.set(xlabel="confidence (top-class probability)", ylabel="examples", xlim=(0, 1))
  return _save(fig, path)


def training_curves(rows: Sequence[dict[str, float]], path: str) -> Optional[str]:
  """Train and test loss, test accuracy and the learning rate against the step; None if the
  rows have none of them."""

  def series(key):
    points = [(r["step"], r[key]) for r in rows if key in r]
    return tuple(zip(*points)) if points else ((), ())

  panels = [
    ("loss", ("train_loss", "test_loss")),
    ("test accuracy", ("test_accuracy",)),
    ("learning rate", ("lr",)),
  ]
  panels = [(t, [k for k in keys if series(k)[0]]) for t, keys in panels]
  panels = [(t, keys) for t, keys in panels if keys]
  if not panels:
    return None
  fig = _figure(5 * len(panels), 4)
  for ax, (title, keys) in zip(np.atleast_1d(fig.subplots(1, len(panels))), panels):
    for key in keys:
      steps, values = series(key)
      ax.plot(
        steps,
        values,
        marker="o" if len(steps) < 30 else None,
        markersize=3,
        label=key.replace("_", " "),
      )
    ax.set(xlabel="step", title=title)
    if title == "test accuracy":
      ax.set_ylim(top=1.0)
    ax.legend(fontsize=8)
  return _save(fig, path)


def _image_grid(count: int, columns: int, cell: float) -> tuple[Figure, np.ndarray]:
  rows = -(-count // columns)
  fig = _figure(cell * columns, cell * rows + 0.5)
  axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
  for ax in axes:
    ax.axis("off")
  return fig, axes


def mistakes_gallery(
  images: Sequence[np.ndarray],
  true_names: Sequence[str],
  predicted_names: Sequence[str],
  probabilities: Sequence[float],
  path: str,
) -> Optional[str]:
  """The given mistakes (most confident first) with their true and predicted class."""
  if not images:
    return None
  fig, axes = _image_grid(len(images), min(4, len(images)), 3.0)
  for ax, image, true, pred, p in zip(axes, images, true_names, predicted_names, probabilities):
    ax.imshow(image)
    ax.set_title(f"true: {true}\npredicted: {pred} ({p:.2f})", fontsize=8)
  fig.suptitle("Most confident mistakes")
  return _save(fig, path)


def attention_overlays(
  images: Sequence[np.ndarray],
  maps: Sequence[np.ndarray],
  captions: Sequence[str],
  title: str,
  path: str,
) -> Optional[str]:
  """Each image beside the same image under its attention map (`images` in [0, 1]); `title`
  (attention.map_kind) says what the maps are: a CNN's are class activation maps."""
  if not len(images):
    return None
  label = "attention" if "attention" in title else "activation"
  fig, axes = _image_grid(2 * len(images), 4, 2.5)
  for i, (image, heat, caption) in enumerate(zip(images, maps, captions)):
    axes[2 * i].imshow(image)
    axes[2 * i].set_title(caption, fontsize=8)
    axes[2 * i + 1].imshow(image)
    axes[2 * i + 1].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[2 * i + 1].set_title(label, fontsize=8)
  fig.suptitle(title[0].upper() + title[1:])
  return _save(fig, path)
