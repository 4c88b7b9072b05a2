"""The evaluation report's numbers, from `predictions.npz` (logits, labels, class names).

Every metric is scikit-learn's except the expected calibration error, which scikit-learn lacks:
`calibration_bins` bins the top-class confidence as `sklearn.calibration.calibration_curve`
does (15 equal-width bins, each (lo, hi]) and `ece` weighs each bin's |accuracy - confidence|
by its share of the examples.
"""

import os
from typing import Any, Mapping, Optional, Union

import numpy as np
import scipy.special
from sklearn import metrics as skm

ECE_BINS = 15
TOP_CONFUSIONS = 20

Predictions = Mapping[str, Any]  # {'logits': [N, C], 'labels': [N], 'class_names': [C], ...}


def load_predictions(path: Union[str, os.PathLike]) -> dict[str, np.ndarray]:
  """predictions.npz as a dict of arrays (no pickles: names and ids are fixed-width strings)."""
  with np.load(path, allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def probabilities(logits: np.ndarray) -> np.ndarray:
  """Softmax in float64, so that rows sum to 1 as log_loss checks."""
  return scipy.special.softmax(np.asarray(logits, np.float64), axis=-1)


def calibration_bins(
  probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
  """Per bin of top-class confidence: count, accuracy and mean confidence (0 where empty)."""
  confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  bin_of = np.searchsorted(edges[1:-1], confidence)  # calibration_curve's binning
  count = np.bincount(bin_of, minlength=n_bins)
  safe = np.maximum(count, 1)
  return dict(
    edges=edges,
    count=count,
    accuracy=np.bincount(bin_of, weights=correct, minlength=n_bins) / safe,
    confidence=np.bincount(bin_of, weights=confidence, minlength=n_bins) / safe,
  )


def ece(bins: Mapping[str, np.ndarray]) -> float:
  """Expected calibration error: sum over bins of (share of examples) x |accuracy - confidence|."""
  share = bins["count"] / bins["count"].sum()
  return float(np.sum(share * np.abs(bins["accuracy"] - bins["confidence"])))


def top_confusions(
  confusion: np.ndarray, class_names: list[str], k: int = TOP_CONFUSIONS
) -> list[dict[str, Any]]:
  """The k most frequent (true, predicted) pairs off the diagonal, most frequent first."""
  off = np.array(confusion, copy=True)
  np.fill_diagonal(off, 0)
  order = np.argsort(-off, axis=None, kind="stable")[:k]
  pairs = [np.unravel_index(i, off.shape) for i in order]
  return [
    dict(true=class_names[t], predicted=class_names[p], count=int(off[t, p]))
    for t, p in pairs
    if off[t, p] > 0
  ]


def _roc_auc(labels: np.ndarray, probs: np.ndarray) -> tuple[Optional[float], list]:
  """One-vs-rest ROC AUC, macro and per class; None where undefined (a class absent, or every
  example of one class)."""
  num_classes = probs.shape[1]
  per_class = []
  for c in range(num_classes):
    positive = labels == c
    defined = 0 < positive.sum() < len(labels)
    per_class.append(float(skm.roc_auc_score(positive, probs[:, c])) if defined else None)
  if any(a is None for a in per_class):
    return None, per_class
  if num_classes == 2:  # scikit-learn's multi-class path wants 3+ columns
    return float(skm.roc_auc_score(labels, probs[:, 1])), per_class
  macro = skm.roc_auc_score(
    labels, probs, multi_class="ovr", average="macro", labels=np.arange(num_classes)
  )
  return float(macro), per_class


def report_from_predictions(source: Union[str, os.PathLike, Predictions]) -> dict[str, Any]:
  """report.json's numbers from a predictions.npz path or its arrays."""
  arrays = source if isinstance(source, Mapping) else load_predictions(source)
  logits, labels = np.asarray(arrays["logits"]), np.asarray(arrays["labels"])
  class_names = [str(n) for n in arrays["class_names"]]
  num_classes = len(class_names)
  if logits.ndim != 2 or logits.shape != (len(labels), num_classes):
    raise ValueError(
      f"logits {logits.shape} do not match {len(labels)} labels and {num_classes} class names"
    )
  if len(labels) == 0:
    raise ValueError("no predictions to report on (an empty split)")
  probs = probabilities(logits)
  predicted = probs.argmax(axis=1)
  every_class = np.arange(num_classes)
  precision, recall, f1, support = skm.precision_recall_fscore_support(
    labels, predicted, labels=every_class, zero_division=0
  )
  confusion = skm.confusion_matrix(labels, predicted, labels=every_class)
  auc_macro, auc_per_class = _roc_auc(labels, probs)
  report: dict[str, Any] = dict(
    count=int(len(labels)),
    class_names=class_names,
    accuracy=float(skm.accuracy_score(labels, predicted)),
  )
  if num_classes > 5:
    report["top5_accuracy"] = float(
      skm.top_k_accuracy_score(labels, probs, k=5, labels=every_class)
    )
  report.update(
    macro_f1=float(
      skm.f1_score(labels, predicted, labels=every_class, average="macro", zero_division=0)
    ),
    weighted_f1=float(
      skm.f1_score(labels, predicted, labels=every_class, average="weighted", zero_division=0)
    ),
    per_class={
      name: dict(
        precision=float(precision[c]),
        recall=float(recall[c]),
        f1=float(f1[c]),
        support=int(support[c]),
      )
      for c, name in enumerate(class_names)
    },
    roc_auc_ovr_macro=auc_macro,
    roc_auc_ovr_per_class=dict(zip(class_names, auc_per_class)),
    log_loss=float(skm.log_loss(labels, probs, labels=every_class)),
    ece=ece(calibration_bins(probs, labels)),
    ece_bins=ECE_BINS,
    confusion_matrix=confusion.tolist(),
    top_confusions=top_confusions(confusion, class_names),
  )
  return report
