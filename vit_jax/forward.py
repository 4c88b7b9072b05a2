"""A jitted forward pass over a whole evaluation split on all devices: every example once, in
split order. The evaluation report's logits and the few-shot evaluator's features come from here.
"""

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax import data_sources, input_pipeline, sharding


def apply_split(
  config: ml_collections.ConfigDict,
  info: data_sources.DatasetInfo,
  fn: Callable[[Any, jax.Array], jax.Array],
  params: Any,
) -> dict[str, np.ndarray]:
  """{'outputs' [N, ...] float32, 'labels' [N], 'indices' [N]}: `fn(params, images)` on every
  example of the eval split (`config.pp.test`), in split order.

  Collective: every process calls it (each feeds its slice); every process gets all N rows.
  """
  mesh = sharding.make_mesh()
  replicated = NamedSharding(mesh, P())
  params = sharding.put_global(params, jax.tree.map(lambda _: replicated, params))
  rows = sharding.batch_sharding(mesh)

  def step(p, batch):
    out = fn(p, batch["image"])
    return dict(outputs=out, label=batch["label"], mask=batch["mask"], index=batch["index"])

  step = jax.jit(step, in_shardings=(replicated, rows), out_shardings=rows)
  ds = input_pipeline.get_eval_dataset(config, info, with_ids=True)
  # Dispatch is asynchronous: the next batch is decoded while this one computes.
  outputs = [step(params, sharding.global_batch(b, mesh)) for b in ds.as_numpy_iterator()]
  host = sharding.to_host(outputs)
  joined = {k: np.concatenate([o[k] for o in host]) for k in ("outputs", "label", "mask", "index")}
  real = joined["mask"] == 1
  order = np.argsort(joined["index"][real], kind="stable")
  indices = joined["index"][real][order].astype(np.int64)
  if not np.array_equal(indices, np.arange(info.num_examples["test"])):
    raise RuntimeError(
      f"evaluation saw {len(indices)} examples, not each of the "
      f"{info.num_examples['test']} of the split once"
    )
  return dict(
    outputs=joined["outputs"][real][order].astype(np.float32),
    labels=joined["label"][real][order].astype(np.int64),
    indices=indices,
  )
