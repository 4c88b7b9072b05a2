"""The Hugging Face export: `ViTForImageClassification` (or `ViTModel` with the pre_logits
pooler), with its ViTConfig and image processor, in the classic (v4) key names."""

import os
from typing import Any, Mapping

import numpy as np
from absl import logging

from vit_jax import models
from vit_jax.convert import pytorch
from vit_jax.convert.metadata import MEAN_STD, POSEMB, ConversionError, Flat
from vit_jax.convert.pytorch import WEIGHTS_FILE, Params


def _hf_outputs(flat: Flat, meta: Mapping[str, Any], path: str) -> str:
  """'logits' (ViTForImageClassification) or 'features' (ViTModel with the pre_logits pooler)."""
  arch = meta["architecture"]
  if models.is_bit(arch):
    raise ConversionError(
      f"{path}: a BiT ResNet: --format hf exports ViTs only (not transformers' "
      "BitForImageClassification); use --format timm or onnx"
    )
  if arch.get("resnet"):
    raise ConversionError(
      f"{path}: a ResNet+ViT hybrid: transformers {_transformers_version()} has no ViT with a "
      "ResNet stem that reads this layout (ViTHybrid is gone); use --format timm"
    )
  if arch["classifier"] != "token":
    raise ConversionError(
      f"{path}: classifier '{arch['classifier']}' (global average pooling): Hugging Face ViT "
      "classifies the class token only; use --format timm"
    )
  head = flat.get("head/kernel")
  if arch["representation_size"] is None:
    if not meta["num_classes"]:
      raise ConversionError(
        f"{path}: has no head (num_classes 0): nothing to classify for "
        "ViTForImageClassification; use --format timm for a feature extractor"
      )
    return "logits"
  if head is not None and np.any(head):
    raise ConversionError(
      f"{path}: has a representation layer (pre_logits) and a trained head; neither "
      "ViTForImageClassification (no pooler) nor timm 1.x can apply tanh(pre_logits) before "
      "the head. Fine-tune with representation_size=None to export a classifier"
    )
  logging.warning(
    "%s: pre_logits with %s head (the in21k release): exporting a ViTModel whose "
    "pooler_output is tanh(pre_logits(cls)); the head is dropped",
    path,
    "an all-zero" if head is not None else "no",
  )
  return "features"


def _transformers_version() -> str:
  import transformers  # pylint: disable=g-import-not-at-top

  return transformers.__version__


def hf_state_dict(flat: Flat, meta: Mapping[str, Any], path: str = "<params>") -> Flat:
  """transformers ViT state dict with the classic (v4) names that 4.x and 5.x both load."""
  outputs = _hf_outputs(flat, meta, path)
  pre = "vit." if outputs == "logits" else ""
  p = Params(flat, path)
  e = pre + "embeddings."
  sd = {
    e + "cls_token": p("cls"),
    e + "position_embeddings": p(POSEMB),
    e + "patch_embeddings.projection.weight": pytorch.conv(p("embedding/kernel")),
    e + "patch_embeddings.projection.bias": p("embedding/bias"),
  }
  for i in range(meta["architecture"]["num_layers"]):
    b, t = pytorch.block(i), f"{pre}encoder.layer.{i}."
    attn = f"{b}/MultiHeadDotProductAttention_0"
    for n in ("query", "key", "value"):
      sd[f"{t}attention.attention.{n}.weight"] = pytorch.attn_in(p(f"{attn}/{n}/kernel"))
      sd[f"{t}attention.attention.{n}.bias"] = p(f"{attn}/{n}/bias").reshape(-1)
    sd[t + "attention.output.dense.weight"] = pytorch.attn_out(p(f"{attn}/out/kernel"))
    sd[t + "attention.output.dense.bias"] = p(f"{attn}/out/bias")
    for hf, ln in (("layernorm_before", "LayerNorm_0"), ("layernorm_after", "LayerNorm_1")):
      sd[f"{t}{hf}.weight"], sd[f"{t}{hf}.bias"] = p(f"{b}/{ln}/scale"), p(f"{b}/{ln}/bias")
    for hf, dense in (("intermediate.dense", "Dense_0"), ("output.dense", "Dense_1")):
      sd[f"{t}{hf}.weight"] = pytorch.linear(p(f"{b}/MlpBlock_0/{dense}/kernel"))
      sd[f"{t}{hf}.bias"] = p(f"{b}/MlpBlock_0/{dense}/bias")
  sd[pre + "layernorm.weight"] = p("Transformer/encoder_norm/scale")
  sd[pre + "layernorm.bias"] = p("Transformer/encoder_norm/bias")
  if outputs == "logits":
    sd["classifier.weight"], sd["classifier.bias"] = (
      pytorch.linear(p("head/kernel")),
      p("head/bias"),
    )
  else:
    sd["pooler.dense.weight"] = pytorch.linear(p("pre_logits/kernel"))
    sd["pooler.dense.bias"] = p("pre_logits/bias")
    p.drop("head/")  # all zeros (checked above)
  p.check_all_used()
  return sd


def hf_config_kwargs(meta: Mapping[str, Any], outputs: str) -> dict[str, Any]:
  """`transformers.ViTConfig` arguments for the model `meta` describes."""
  arch = meta["architecture"]
  kw = dict(
    hidden_size=arch["hidden_size"],
    num_hidden_layers=arch["num_layers"],
    num_attention_heads=arch["num_heads"],
    intermediate_size=arch["mlp_dim"],
    # The checkpoints were trained with tanh-approximate GELU; HF's "gelu" is exact erf.
    hidden_act="gelu_pytorch_tanh" if arch["gelu_approximate"] else "gelu",
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    layer_norm_eps=1e-6,  # HF's default is 1e-12; the checkpoints use 1e-6
    image_size=meta["image_size"],
    patch_size=arch["patch_size"],
    num_channels=3,
    qkv_bias=True,
    encoder_stride=arch["patch_size"],
  )
  if outputs == "logits":
    names = meta["class_names"]
    kw.update(
      architectures=["ViTForImageClassification"],
      id2label={i: n for i, n in enumerate(names)},
      label2id={n: i for i, n in enumerate(names)},
    )
  else:
    kw.update(
      architectures=["ViTModel"], pooler_output_size=arch["representation_size"], pooler_act="tanh"
    )
  return kw


def export_hf(flat: Flat, meta: Mapping[str, Any], output_dir: str, path: str = "<params>") -> str:
  """Writes config.json, model.safetensors, preprocessor_config.json; returns the output kind."""
  pytorch.check_import_order()
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.image_utils import PILImageResampling  # pylint: disable=g-import-not-at-top

  outputs = _hf_outputs(flat, meta, path)
  sd = hf_state_dict(flat, meta, path)
  os.makedirs(output_dir, exist_ok=True)
  transformers.ViTConfig(**hf_config_kwargs(meta, outputs)).save_pretrained(output_dir)
  size = meta["image_size"]
  transformers.ViTImageProcessor(
    do_resize=True,
    size={"height": size, "width": size},
    resample=PILImageResampling.BILINEAR,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=MEAN_STD,
    image_std=MEAN_STD,
  ).save_pretrained(output_dir)
  pytorch.save_safetensors(sd, os.path.join(output_dir, WEIGHTS_FILE))
  return outputs


def load_hf(model_dir: str) -> "torch.nn.Module":  # noqa: F821
  """ViTForImageClassification (or ViTModel for features) from `model_dir`, all keys checked."""
  pytorch.check_import_order()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  config = transformers.ViTConfig.from_pretrained(model_dir)
  cls = (
    transformers.ViTModel
    if config.architectures == ["ViTModel"]
    else transformers.ViTForImageClassification
  )
  model, info = cls.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
  bad = {k: v for k, v in info.items() if v}  # missing / unexpected / mismatched keys, errors
  if bad:
    raise ConversionError(f"{model_dir}: transformers did not load every weight: {bad}")
  return model.eval()
