"""Defaults shared by every config, and the dataset presets.

Field names follow google-research/vision_transformer (`configs/common.py`) wherever the concept
exists there; fields that are ours are marked "(ours)". Every field is declared here so that a
typo on the command line (`--config.totl_steps=10`) is an error, not a silently ignored value.
"""

import ml_collections
from ml_collections import config_dict

# name -> (what `config.dataset` becomes, crop, total_steps, train / val / test splits, classes).
# Splits use tfds syntax; folders and Fashion-MNIST know 'train'/'test', and take val from a
# val/ folder or config.val_fraction of train (val ''). The tfds presets hold out part of train
# as the anchors do (big_vision's minival, the original presets' train[98%:]).
DATASET_PRESETS = {
  "shoes": dict(dataset="data/shoes", crop=224, total_steps=2_000, train="train", test="test"),
  "cifar10": dict(
    dataset="cifar10",
    crop=384,
    total_steps=10_000,
    train="train[:98%]",
    val="train[98%:]",
    test="test",
  ),
  "cifar100": dict(
    dataset="cifar100",
    crop=384,
    total_steps=10_000,
    train="train[:98%]",
    val="train[98%:]",
    test="test",
  ),
  "oxford_iiit_pet": dict(
    dataset="oxford_iiit_pet",
    crop=384,
    total_steps=500,
    train="train[:90%]",
    val="train[90%:]",
    test="test",
  ),
  "oxford_flowers102": dict(
    dataset="oxford_flowers102",
    crop=384,
    total_steps=500,
    train="train",
    val="validation",
    test="test",
  ),
  "food101": dict(
    dataset="food101",
    crop=384,
    total_steps=10_000,
    train="train[:99%]",
    val="train[99%:]",
    test="validation",
  ),
  "fashion_mnist": dict(
    dataset="fashion_mnist", crop=32, total_steps=3_000, train="train", test="test"
  ),
  # The three footwear classes of Fashion-MNIST: a real shoe-recognition task offline.
  "fashion_mnist_shoes": dict(
    dataset="fashion_mnist",
    crop=32,
    total_steps=1_500,
    train="train",
    test="test",
    classes=("Sandal", "Sneaker", "Ankle boot"),
  ),
}


def get_config() -> ml_collections.ConfigDict:
  """Returns the shared defaults. Configs start from this and then lock."""
  config = ml_collections.ConfigDict()

  # --- Model -------------------------------------------------------------------------------
  config.model_name = "ViT-B_16"  # a key of vit_jax.models.MODEL_CONFIGS
  # Fields of the model (ours), passed as they are: models.get_model(name, n, **config.model).
  # `None` keeps the preset's value. A new model option is one field here and one in the module.
  config.model = ml_collections.ConfigDict(
    dict(
      dropout_rate=config_dict.placeholder(float),
      attention_dropout_rate=config_dict.placeholder(float),
      stochastic_depth=config_dict.placeholder(float),
      representation_size=config_dict.placeholder(int),
      classifier=config_dict.placeholder(str),
      gelu_approximate=config_dict.placeholder(bool),
      # compute dtype: float32 or bfloat16 (parameters stay float32); None: bfloat16 on TPU,
      # float32 elsewhere (models.dtype_default)
      dtype=config_dict.placeholder(str),
      remat=False,  # rematerialise each encoder block (trade compute for memory)
      # what a rematerialised block keeps: models_vit.REMAT_POLICIES, least memory first
      remat_policy="nothing_saveable",
      # keep only GELU's input for the backward pass and recompute its tanh there: one
      # [batch, tokens, mlp_dim] activation per block less to store (same values)
      recompute_gelu=False,
      # attention kernel: "" (XLA's), "einsum" (weights materialised) or "cudnn" (fused flash
      # attention on NVIDIA GPUs); None: "einsum" on TPU, "" elsewhere
      attention_impl=config_dict.placeholder(str),
      # route the residual gradient through a conditional before each block (same values); None:
      # on for the CPU backend only, where XLA otherwise re-derives it quadratically in depth
      cotangent_boundaries=config_dict.placeholder(bool),
      # the hybrid ResNet stem, as the original `config.resnet` (the R...+ViT presets set it):
      # stage depths, e.g. (3, 4, 9) for R50, () for the root alone; root width 64 * width_factor
      resnet=ml_collections.ConfigDict(
        dict(num_layers=config_dict.placeholder(tuple), width_factor=config_dict.placeholder(float))
      ),
    )
  )

  # --- Initialisation: the resume ladder is workdir > resume > pretrained > scratch ---------
  config.pretrained_dir = "checkpoints"  # where {model_name}.npz is looked up
  config.pretrained_path = ""  # (ours) an explicit .npz path; overrides pretrained_dir
  config.from_scratch = False  # (ours) ignore any pretrained file: random initialisation
  config.resume = ""  # (ours) an orbax checkpoint dir to resume from when the workdir has none

  # --- Data ---------------------------------------------------------------------------------
  config.dataset = ""  # a tfds name, an image-folder path, or "fashion_mnist"
  config.classes = ()  # (ours) keep only these class names, relabelled 0..K-1 (empty: all)
  config.test_fraction = 0.2  # (ours) test share when a folder has no train/ and test/ split
  # (ours) validation share of train, per class, when there is no val/ folder or config.pp.val;
  # 0: no validation split (then no evaluation during training, and no best_metric)
  config.val_fraction = 0.1
  config.tfds_data_dir = ""
  config.tfds_manual_dir = ""
  config.tfds_download = False  # (ours) off: an offline tfds download hangs for minutes
  config.fashion_mnist_dir = ""  # (ours) empty: the Debian package's location, then .cache/
  config.strict_images = False  # (ours) an unreadable image is an error instead of a warning
  config.shuffle_buffer = 50_000  # bounds host memory for tfds sources
  config.cache = False  # (ours) cache decoded eval images in memory
  config.prefetch = 2  # batches prefetched to the devices

  config.pp = ml_collections.ConfigDict(
    dict(
      train="train",
      val="",  # a tfds split ("train[98%:]", "validation"); "": val/ or config.val_fraction
      test="test",
      crop=224,  # training and evaluation resolution
      eval_resize=0,  # (ours) >crop: resize to this, then central crop; 0: resize to crop
      inception_crop=True,  # (ours) random area crop (Inception style) for training
      area_min=0.05,  # (ours) smallest crop area of the Inception crop
      flip=True,  # (ours) random horizontal flip for training
      bfloat16=False,  # (ours) images in bfloat16 (halves host->device traffic)
    )
  )

  # --- Optimisation ---------------------------------------------------------------------------
  config.total_steps = 10_000
  # (ours) train for this many epochs instead: total_steps = ceil(epochs * train / batch) (set
  # total_steps=0); warmup_epochs likewise replaces warmup_steps
  config.num_epochs = 0.0
  config.warmup_epochs = 0.0
  config.batch = 512  # global batch, over all processes and devices
  config.batch_eval = 512
  config.accum_steps = 1  # gradient-accumulation micro-steps per update
  config.optimizer = "sgd"  # (ours) "sgd" (momentum 0.9, as the paper) or "adamw"
  config.momentum = 0.9  # (ours)
  config.optim_dtype = "bfloat16"  # dtype of the SGD momentum / Adam first moment
  config.base_lr = 0.03
  config.decay_type = "cosine"  # "cosine" or "linear"
  config.linear_end = 1e-5
  config.warmup_steps = 500
  config.grad_norm_clip = 1.0
  config.weight_decay = 0.0  # (ours) decoupled; applied to kernels only
  config.label_smoothing = 0.0  # (ours)

  # --- Parallelism (ours) -----------------------------------------------------------------------
  config.parallelism = "jit"  # "jit" (Mesh + NamedSharding) or "pmap"; same numbers
  config.fsdp = False  # jit only: shard parameters and optimizer state over the data axis

  # --- Loop, checkpoints, logging --------------------------------------------------------------
  config.seed = 0
  config.eval_every = 100
  config.checkpoint_every = 1_000
  config.progress_every = 10
  config.keep_checkpoints = 2  # (ours) orbax max_to_keep
  config.async_checkpoints = True  # (ours)
  config.export_npz = True  # (ours) write params.npz in the original format at the end
  # (ours) "val_accuracy" or "val_loss": also keep the best evaluation's checkpoint in
  # checkpoints_best/ (beside the latest ones) and export it as best_params.npz; "": off.
  # Chosen on validation; the test split is read once, at the end.
  config.best_metric = ""
  # (ours) stop after this many evaluations without improvement of best_metric (0: off)
  config.early_stop_patience = 0
  config.report = False  # (ours) write the evaluation report (vit_jax.evaluate) to WORKDIR/report
  # (ours) few-shot linear evaluation of the features (vit_jax.fewshot), as big_vision runs it
  # during pretraining: on each dataset (a DATASET_PRESETS name or an image folder) at the
  # training resolution, `shots` examples per class, `seeds` samples; every `every` steps and
  # at the end (0: at the end only). Written to metrics.jsonl and TensorBoard as
  # fewshot_{dataset}_{shots}shot (mean accuracy over seeds) and ..._std.
  config.fewshot = ml_collections.ConfigDict(
    dict(datasets=(), shots=(1, 5, 10, 25), seeds=5, every=0)
  )
  return config


def with_dataset(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Applies DATASET_PRESETS[name] to `config` (in place) and returns it."""
  if name not in DATASET_PRESETS:
    raise ValueError(f"Unknown dataset preset {name!r}; known: {sorted(DATASET_PRESETS)}")
  preset = DATASET_PRESETS[name]
  config.dataset = preset["dataset"]
  config.pp.crop = preset["crop"]
  config.total_steps = preset["total_steps"]
  config.pp.train = preset["train"]
  config.pp.val = preset.get("val", "")
  config.pp.test = preset["test"]
  config.classes = tuple(preset.get("classes", ()))
  return config


def with_dataset_or_folder(
  config: ml_collections.ConfigDict, dataset: str
) -> ml_collections.ConfigDict:
  """A preset of DATASET_PRESETS (with_dataset), or else an image folder with its train and
  test splits and all its classes; the resolution is kept. In place; returns `config`."""
  crop = config.pp.crop
  if dataset in DATASET_PRESETS:
    with_dataset(config, dataset)
  else:
    config.dataset, config.classes = dataset, ()
    config.pp.train, config.pp.val, config.pp.test = "train", "", "test"
  config.pp.crop = crop
  return config


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-name values set (`{"model.remat": True}`), as the
  `--config.FIELD=VALUE` flags set them."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *path, leaf = key.split(".")
      for p in path:
        node = node[p]
      node[leaf] = value
  return config
