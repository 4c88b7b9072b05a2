"""report.html: one self-contained page (figures inlined as base64 PNG, no external resource),
so that it opens offline and travels as a single file."""

import base64
import html
from typing import Any, Mapping, Optional

from vit_jax.evaluation import figures as eval_figures

_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1.5em 0; } img { max-width: 100%; border: 1px solid #eee; }
.muted { color: #777; }
"""

# Figure key -> heading, in page order.
FIGURES = {
  "confusion_matrix": "Confusion matrix",
  "roc_curves": "ROC curves",
  "reliability_diagram": "Calibration",
  "training_curves": "Training curves",
  "mistakes": "Most confident mistakes",
  "attention": "Attention or class activation maps",
}


def _number(value: Any) -> str:
  if value is None:
    return '<span class="muted">n/a</span>'
  return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]], table_id: str) -> str:
  head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{_number(v)}</td>" for v in row) + "</tr>" for row in rows)
  return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _image(key: str, path: str) -> str:
  with open(path, "rb") as f:
    data = base64.b64encode(f.read()).decode("ascii")
  return (
    f'<figure><img id="fig-{key}" alt="{html.escape(FIGURES[key])}" '
    f'src="data:image/png;base64,{data}"></figure>'
  )


def render(
  report: Mapping[str, Any], figures: Mapping[str, Optional[str]], source: Mapping[str, Any]
) -> str:
  """The page: summary, figures (PNG paths by FIGURES key; None or absent: left out), tables."""
  names = report["class_names"]
  summary = [["examples", report["count"]], ["accuracy", report["accuracy"]]]
  if "top5_accuracy" in report:
    summary.append(["top-5 accuracy", report["top5_accuracy"]])
  summary += [
    ["macro F1", report["macro_f1"]],
    ["weighted F1", report["weighted_f1"]],
    ["ROC AUC (one vs rest, macro)", report["roc_auc_ovr_macro"]],
    ["log loss", report["log_loss"]],
    [f"expected calibration error ({report['ece_bins']} bins)", report["ece"]],
  ]
  per_class = [
    [n, c["precision"], c["recall"], c["f1"], c["support"], report["roc_auc_ovr_per_class"][n]]
    for n, c in report["per_class"].items()
  ]
  parts = [
    f"<h1>Evaluation of {html.escape(str(source.get('checkpoint', '')))}</h1>",
    "<p>"
    + ", ".join(f"{html.escape(k)}: <code>{html.escape(str(v))}</code>" for k, v in source.items())
    + "</p>",
    "<h2>Summary</h2>",
    _table(["metric", "value"], summary, "summary"),
  ]
  for key, heading in FIGURES.items():
    if figures.get(key):
      parts += [f"<h2>{heading}</h2>", _image(key, figures[key])]
      if key == "confusion_matrix" and len(names) <= eval_figures.MAX_GRID_CLASSES:
        rows = [[names[i]] + list(row) for i, row in enumerate(report["confusion_matrix"])]
        parts.append(_table(["true \\ predicted"] + names, rows, "confusion-matrix"))
      if key == "confusion_matrix" and report["top_confusions"]:
        rows = [[c["true"], c["predicted"], c["count"]] for c in report["top_confusions"]]
        parts.append(_table(["true", "predicted", "count"], rows, "top-confusions"))
  parts += [
    "<h2>Per class</h2>",
    _table(["class", "precision", "recall", "F1", "support", "ROC AUC"], per_class, "per-class"),
  ]
  return (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
    f"<title>Evaluation report</title><style>{_STYLE}</style></head><body>\n"
    + "\n".join(parts)
    + "\n</body></html>\n"
  )
