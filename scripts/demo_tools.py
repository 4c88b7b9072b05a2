"""Helpers of scripts/demo.sh (not meant to be run by hand).

demo_tools.py stage FOLDER START_TIME         writes FOLDER/stage.json (seconds, commands, accuracy)
demo_tools.py samples FOLDER [FMNIST_DIR]     writes 2 held-out test PNGs per footwear class
demo_tools.py show PREDICTIONS_JSON           prints predictions next to the true classes
demo_tools.py fewshot FOLDER                  prints FOLDER/{pretrained,random}.json side by side
demo_tools.py summary WORKDIR PRETRAINED START_TIME QUICK   writes WORKDIR/summary.json
"""

import json
import os
import pathlib
import sys
import time
from typing import Any, Optional

STAGES = ("pretrain", "finetune", "scratch", "fewshot", "predict", "convert")
STARTS = ("pretrained", "random")  # the few-shot stage's two feature extractors
SAMPLES_PER_CLASS = 2


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def write_stage(folder: str, start_time: float) -> dict[str, Any]:
  """Records a finished stage: wall seconds, its commands, and its training's last evaluation."""
  with open(os.path.join(folder, "commands.txt")) as f:
    record: dict[str, Any] = dict(
      seconds=round(time.time() - start_time, 1), commands=f.read().splitlines()
    )
  metrics = os.path.join(folder, "metrics.jsonl")
  if os.path.exists(metrics):
    with open(metrics) as f:
      # Once, at the end: test_* (the final params) and best_test_* (the best) are two rows.
      evals = [r for r in map(json.loads, f) if "test_accuracy" in r or "best_test_accuracy" in r]
    if evals:
      last = {k: v for row in evals for k, v in row.items()}
      # The model the demo goes on with: the best validation checkpoint when there is one.
      record.update(
        test_accuracy=last.get("best_test_accuracy", last["test_accuracy"]),
        final_test_accuracy=last["test_accuracy"],
        step=last["step"],
        test_count=int(last["test_count"]),
      )
  best = os.path.join(folder, "best_params.json")
  if os.path.exists(best):
    meta = _read_json(best)
    record["chosen"] = dict(
      metric=meta["best_metric"], split=meta["chosen_on"], step=meta["best_step"]
    )
  with open(os.path.join(folder, "stage.json"), "w") as f:
    json.dump(record, f, indent=2)
  accuracy = f", test accuracy {record['test_accuracy']:.4f}" if "test_accuracy" in record else ""
  if "chosen" in record:
    c = record["chosen"]
    accuracy += (
      f" (best_params.npz: chosen by {c['metric']} on the {c['split']} split, step "
      f"{c['step']} of {record['step']})"
    )
  print(f"== {os.path.basename(folder)}: done in {record['seconds']:.0f} s{accuracy}")
  return record


def _true_class(image_path: str) -> str:
  """Sample files are named test{index}_{class}.png by `write_samples`."""
  return pathlib.Path(image_path).stem.split("_", 1)[1].replace("_", " ")


def write_samples(folder: str, fashion_mnist_dir: Optional[str] = None) -> None:
  """Saves the first test images of each footwear class as 28x28 PNGs (held out: test split)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from configs import shoes  # pylint: disable=g-import-not-at-top
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  config = shoes.get_config("demo")
  if fashion_mnist_dir:
    with config.unlocked():
      config.fashion_mnist_dir = fashion_mnist_dir
  info = input_pipeline.get_dataset_info(config)
  test = info.source.splits["test"]
  os.makedirs(folder, exist_ok=True)
  for label, name in enumerate(info.class_names):
    for index in [i for i, l in enumerate(test.labels) if l == label][:SAMPLES_PER_CLASS]:
      file_name = f"test{index:04d}_{name.replace(' ', '_')}.png"
      Image.fromarray(test.data[index]).save(os.path.join(folder, file_name))
  print(f"wrote {SAMPLES_PER_CLASS * info.num_classes} Fashion-MNIST test images to {folder}")


def show_predictions(path: str) -> None:
  result = _read_json(path)
  for p in result["predictions"]:
    best = p["top_k"][0]
    mark = "ok   " if best["label"] == _true_class(p["image"]) else "WRONG"
    others = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in p["top_k"][1:])
    print(
      f"{mark} {os.path.basename(p['image']):<28} -> {best['label']:<10} "
      f"{best['probability']:.3f}  ({others})"
    )
  for e in result["errors"]:
    print(f"error {e['image']}: {e['error']}")


def write_summary(workdir: str, pretrained: str, start_time: float, quick: bool) -> None:
  stages = {
    name: _read_json(os.path.join(workdir, name, "stage.json"))
    for name in STAGES
    if os.path.exists(os.path.join(workdir, name, "stage.json"))
  }
  predictions = _read_json(os.path.join(workdir, "predict", "predictions.json"))["predictions"]
  correct = sum(p["top_k"][0]["label"] == _true_class(p["image"]) for p in predictions)
  timm_dir = os.path.join(workdir, "convert", "timm")
  tables = fewshot_tables(os.path.join(workdir, "fewshot"))
  summary = dict(
    test_accuracy=stages["finetune"]["test_accuracy"],
    scratch_test_accuracy=stages["scratch"]["test_accuracy"],
    pretrain_test_accuracy=stages["pretrain"]["test_accuracy"],
    test_count=stages["finetune"]["test_count"],
    # what chose the fine-tuned model: {metric, split, step}; test was read once, at the end
    chosen=stages["finetune"].get("chosen"),
    final_test_accuracy=stages["finetune"].get("final_test_accuracy"),
    # linear few-shot accuracy of the frozen features, mean over seeds (fractions, as above)
    fewshot={s: {k: r["mean"] for k, r in t["shots"].items()} for s, t in tables.items()},
    fewshot_std={s: {k: r["std"] for k, r in t["shots"].items()} for s, t in tables.items()},
    fewshot_seeds=tables["pretrained"]["seeds"],
    seconds=round(sum(s["seconds"] for s in stages.values()), 1),
    stage_seconds={k: s["seconds"] for k, s in stages.items()},
    wall_seconds_this_run=round(time.time() - start_time, 1),
    quick=quick,
    sample_predictions_correct=f"{correct}/{len(predictions)}",
    paths=dict(
      pretrained_checkpoint=pretrained,
      finetuned_npz=os.path.join(workdir, "finetune", "best_params.npz"),
      scratch_npz=os.path.join(workdir, "scratch", "params.npz"),
      samples=os.path.join(workdir, "samples"),
      predictions=os.path.join(workdir, "predict", "predictions.json"),
      timm_model=timm_dir if os.path.isdir(timm_dir) else None,
    ),
    commands={k: s["commands"] for k, s in stages.items()},
  )
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  note = " (DEMO_QUICK: a smoke test, not the real numbers)" if quick else ""
  print(f"\n== Offline demo done: {summary['seconds']:.0f} s in all{note}")
  print(
    f"  pretrained, 7 non-footwear classes:      test accuracy "
    f"{summary['pretrain_test_accuracy']:.4f}"
  )
  chosen = summary["chosen"] or {}
  print(
    f"  fine-tuned on the 3 footwear classes:    test accuracy "
    f"{summary['test_accuracy']:.4f} ({summary['test_count']} images; the checkpoint chosen by "
    f"{chosen.get('metric')} on the {chosen.get('split')} split, step {chosen.get('step')})"
  )
  print(
    f"  same fine-tuning from random weights:    test accuracy "
    f"{summary['scratch_test_accuracy']:.4f}"
  )
  for k in summary["fewshot"]["pretrained"]:
    print(
      f"  linear {k:>2}-shot, pretrained / random:     "
      f"{summary['fewshot']['pretrained'][k]:.4f} / {summary['fewshot']['random'][k]:.4f}"
    )
  print(f"  sample images classified correctly:      {summary['sample_predictions_correct']}")
  print("Results:")
  for key, value in summary["paths"].items():
    print(f"  {key:<22} {value or '(not produced: the converter is not in this checkout)'}")
  print(f"  {'summary':<22} {os.path.join(workdir, 'summary.json')}")


def fewshot_tables(folder: str) -> dict[str, dict[str, Any]]:
  """{start: vit_jax.fewshot's JSON} for the pretrained checkpoint and the random start."""
  return {start: _read_json(os.path.join(folder, f"{start}.json")) for start in STARTS}


def show_fewshot(folder: str) -> None:
  tables = fewshot_tables(folder)
  first = tables["pretrained"]
  print(
    f"linear {len(first['class_names'])}-way few-shot accuracy on {first['test_examples']} test "
    f"images, {first['feature_dim']}-d features at {first['image_size']} px, mean +- std over "
    f"{first['seeds']} seeds:"
  )
  print(f"  {'shots per class':>15}  {'pretrained':>16}  {'random weights':>16}")
  for k in first["shots"]:
    cells = [f"{t['shots'][k]['mean']:.4f} +- {t['shots'][k]['std']:.4f}" for t in tables.values()]
    print(f"  {k:>15}  {cells[0]:>16}  {cells[1]:>16}")


def main(argv: list[str]) -> None:
  command, args = argv[1], argv[2:]
  if command == "stage":
    write_stage(args[0], float(args[1]))
  elif command == "samples":
    write_samples(args[0], args[1] if len(args) > 1 else None)
  elif command == "show":
    show_predictions(args[0])
  elif command == "summary":
    write_summary(args[0], args[1], float(args[2]), args[3] == "1")
  elif command == "fewshot":
    show_fewshot(args[0])
  else:
    raise SystemExit(f"demo_tools.py: unknown command {command!r}; see its docstring")


if __name__ == "__main__":
  main(sys.argv)
