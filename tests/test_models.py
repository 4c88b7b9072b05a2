"""Model presets: golden parameter counts, shapes, dtypes, classifier variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models, models_vit


def _count(name, num_classes, image_size=224, **overrides):
  model = models.get_model(name, num_classes, **overrides)
  x = jnp.zeros((1, image_size, image_size, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


# google-research/vision_transformer models_test.py values (1000 classes, 224 px).
GOLDEN = {
  "ViT-Ti_16": 5_717_416,
  "ViT-S_16": 22_050_664,
  "ViT-S_32": 22_878_952,
  "ViT-B_16": 86_567_656,
  "ViT-B_32": 88_224_232,
  "ViT-B_8": 86_576_872,
  "ViT-L_16": 304_326_632,
  "ViT-L_32": 306_535_400,
  "ViT-H_14": 632_045_800,
  "ViT-S_16-gap-norep": 22_049_896,
  "ViT-B_16-gap-norep": 86_566_120,
  "testing": 21_390,
  "ViT-tiny_4": 469_032,
  # By hand: embedding 7*7*3*64+64 = 9,472; cls 64; position (32*32+1)*64 = 65,600; 4 blocks of
  # 2 LayerNorms 256 + q/k/v/out 4*(64*64+64) 16,640 + MLP 64*256+256 + 256*64+64 = 33,088 ->
  # 49,984 each; encoder_norm 128; head 64*1000+1000 = 65,000.
  "ViT-tiny_7": 340_200,
  # Hybrids, from the same models_test.py (R+ViT-Ti_16 is the root alone, then 8x8 patches).
  "R+ViT-Ti_16": 6_337_704,
  "R26+ViT-S_32": 36_431_912,
  "R26+ViT-B_32": 101_383_976,
  "R50+ViT-B_16": 98_659_112,
  "R50+ViT-L_32": 328_994_856,
  # By hand: conv_root 7*7*3*32 = 4,704; gn_root 64; embedding 2*2*32*64+64 = 8,256; cls 64;
  # position (28*28+1)*64 = 50,240; ViT-tiny_7's 4 blocks 199,936, encoder_norm 128, head 65,000.
  "R+ViT-tiny_8": 328_392,
}


def test_every_preset_has_a_golden_count():
  # The BiT ResNets' golden counts are in test_bit.py.
  assert set(models.MODEL_CONFIGS) - set(models.BIT_CONFIGS) == set(GOLDEN)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_parameter_count(name):
  assert _count(name, 1000) == GOLDEN[name]


def test_in21k_b16_with_pre_logits_count():
  assert _count("ViT-B_16", 21843, representation_size=768) == 103_186_515


def test_resnet_stem_accepts_the_original_config_dict():
  # The original configs set `config.resnet` as a ConfigDict; a mapping works the same.
  import ml_collections  # pylint: disable=g-import-not-at-top

  resnet = ml_collections.ConfigDict(dict(num_layers=(), width_factor=1))
  assert _count("ViT-Ti_16", 1000, patch_size=8, resnet=resnet) == GOLDEN["R+ViT-Ti_16"]


def test_bad_resnet_config_is_a_clear_error():
  with pytest.raises(ValueError, match="multiple of 32"):
    models.get_model("R+ViT-tiny_8", 3, resnet=dict(num_layers=(), width_factor=0.25))


def test_forward_shape_and_float32_logits_with_bfloat16_compute():
  model = models.get_model("testing", 7, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 32, 32, 3))
  params = model.init(jax.random.key(0), x, train=False)["params"]
  assert jax.tree.leaves(params)[0].dtype == jnp.float32  # parameters stay float32
  out = model.apply({"params": params}, x, train=False)
  assert out.shape == (2, 7) and out.dtype == jnp.float32


def test_num_classes_zero_returns_features():
  model = models.get_model("testing", 0)
  x = jnp.zeros((2, 32, 32, 3))
  params = model.init(jax.random.key(0), x, train=False)["params"]
  assert "head" not in params
  assert model.apply({"params": params}, x).shape == (2, 10)


def test_gelu_switch_changes_the_function():
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  tanh = models.get_model("testing", 4, head_bias_init=0.0)
  params = tanh.init(jax.random.key(0), x)["params"]
  # A random head (a constant one sums LayerNorm's zero-mean features to 0); the rest as
  # initialised, so that the MLP's inputs stay O(1), where the two GELUs differ.
  params["head"]["kernel"] = jax.random.normal(jax.random.key(2), params["head"]["kernel"].shape)
  exact = models.get_model("testing", 4, gelu_approximate=False)
  a = tanh.apply({"params": params}, x)
  b = exact.apply({"params": params}, x)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-6


def test_train_mode_dropout_and_stochastic_depth_need_an_rng_and_differ():
  model = models.get_model("ViT-tiny_4", 0, stochastic_depth=0.5)  # features: head is zeros
  x = jnp.ones((4, 32, 32, 3))
  params = model.init(jax.random.key(0), x)["params"]
  a = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
  b = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
  c = model.apply({"params": params}, x, train=False)
  assert not np.allclose(a, b) and np.allclose(c, model.apply({"params": params}, x))


def test_remat_gives_the_same_function():
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  plain, remat = models.get_model("testing", 3), models.get_model("testing", 3, remat=True)
  params = plain.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: p + 0.1, params)
  np.testing.assert_allclose(
    plain.apply({"params": params}, x), remat.apply({"params": params}, x), atol=1e-6
  )


def _grad_fn(model, x):
  def loss(params):
    # train=True: the dropout masks (same key) are part of what must match.
    logits = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
    return jnp.sum(logits * jnp.arange(3.0))

  return jax.jit(jax.grad(loss))


@pytest.mark.parametrize("field", ["cotangent_boundaries", "recompute_gelu"])
def test_speed_switches_give_the_same_gradients(field):
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  on = models.get_model("testing", 3, **{field: True})
  off = models.get_model("testing", 3, **{field: False})
  params = jax.tree.map(lambda p: p + 0.1, on.init(jax.random.key(0), x)["params"])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    _grad_fn(on, x)(params),
    _grad_fn(off, x)(params),
  )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the boundaries are a CPU fix")
def test_cotangent_boundaries_are_on_by_default_on_cpu_and_survive_xla():
  # One conditional per block in the optimised CPU program: if an XLA upgrade folds them away,
  # the training step silently gets slower again (docs/benchmarks.md).
  x = jnp.zeros((2, 32, 32, 3))
  default = models.get_model("ViT-tiny_4", 3)
  params = default.init(jax.random.key(0), x)["params"]
  count = lambda m: _grad_fn(m, x).lower(params).compile().as_text().count(" conditional(")
  assert (count(default), count(default.clone(cotangent_boundaries=False))) == (
    default.num_layers,
    0,
  )


def test_unknown_model_name_and_field_are_clear_errors():
  with pytest.raises(ValueError, match="Unknown model_name 'ViT-X'"):
    models.get_model("ViT-X", 10)
  with pytest.raises(ValueError, match="Unknown model field"):
    models.get_model("testing", 10, hiden_size=3)


def test_metadata_round_trip_rebuilds_the_same_model():
  model = models.get_model("ViT-tiny_4", 3, gelu_approximate=False)
  meta = models.model_metadata(model, image_size=32, class_names=["a", "b", "c"])
  rebuilt = models.model_from_metadata(meta)
  for field in ("patch_size", "hidden_size", "num_layers", "num_classes", "gelu_approximate"):
    assert getattr(rebuilt, field) == getattr(model, field)


def test_recompute_gelu_saves_at_least_one_mlp_activation_per_block():
  x = jnp.zeros((2, 32, 32, 3))  # ViT-tiny_4: 65 tokens, mlp_dim 256, 4 blocks
  model = models.get_model("ViT-tiny_4", 3, cotangent_boundaries=False)
  params = model.init(jax.random.key(0), x)["params"]

  def residual_bytes(m):  # what the backward pass keeps from the forward pass
    _, vjp_fn = jax.vjp(lambda p: m.apply({"params": p}, x, train=False), params)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(vjp_fn))

  saved = residual_bytes(model) - residual_bytes(model.clone(recompute_gelu=True))
  assert saved >= model.num_layers * 2 * 65 * model.mlp_dim * 4


# ---------------------------------------------------------------------------------------------
# The model's speed options compute the same function.


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_remat_policies_keep_the_gradients(policy):
  """A speed option, not a new function: rematerialised gradients equal the plain ones."""
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  plain = models.get_model("testing", 3, dropout_rate=0.0)
  remat = models.get_model("testing", 3, dropout_rate=0.0, remat=True, remat_policy=policy)
  params = jax.tree.map(lambda p: p + 0.1, plain.init(jax.random.key(0), x)["params"])
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x, train=True) ** 2))(params)
  for a, b in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(remat))):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_unknown_remat_policy_is_a_clear_error():
  with pytest.raises(ValueError, match="remat_policy must be one of"):
    models.get_model("testing", 3, remat=True, remat_policy="everything")


def test_padded_attention_is_the_same_function():
  """The cuDNN path pads ViT's 197 tokens to 256 and masks them: same outputs as unpadded."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 197, 3, 8)) for i in range(3))
  want = jax.nn.dot_product_attention(q, k, v)
  got = models_vit.padded_dot_product_attention(q, k, v, implementation=None, multiple=64)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-6)
  grads = [
    jax.grad(lambda q, f=f: jnp.sum(f(q) ** 2))(q)
    for f in (
      lambda q: jax.nn.dot_product_attention(q, k, v),
      lambda q: models_vit.padded_dot_product_attention(q, k, v, implementation=None),
    )
  ]
  np.testing.assert_allclose(grads[0], grads[1], atol=1e-5)


def test_einsum_attention_is_the_same_function():
  """attention_impl='einsum' (the TPU default) computes what XLA's dot_product_attention does."""
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
  xla = models.get_model("ViT-tiny_4", 3, attention_impl="")
  einsum = models.get_model("ViT-tiny_4", 3, attention_impl="einsum")
  params = jax.tree.map(lambda p: p + 0.1, xla.init(jax.random.key(0), x)["params"])
  np.testing.assert_allclose(
    einsum.apply({"params": params}, x), xla.apply({"params": params}, x), rtol=1e-5, atol=1e-5
  )
  got, want = _grad_fn(einsum, x)(params), _grad_fn(xla, x)(params)
  # Float32 rounding of two summation orders, against the gradients' scale (the key bias's
  # gradient is zero analytically: rounding noise on both paths).
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale), got, want)


@pytest.mark.parametrize(
  "platform, want",
  [("tpu", (jnp.bfloat16, "einsum", False)), ("cpu", (jnp.float32, None, True))],
)
def test_unset_fields_take_the_platforms_defaults(platform, want):
  # What a config's model block passes when dtype, attention_impl, cotangent_boundaries are unset.
  unset = dict(dtype=None, attention_impl=None, cotangent_boundaries=None)
  model = models.get_model("ViT-tiny_4", 3, platform=platform, **unset)
  assert (jnp.dtype(model.dtype), model.attention_impl, model.cotangent_boundaries) == want
  # A BiT takes the dtype and has no attention.
  bit = models.get_model("BiT-tiny", 3, platform=platform, **unset)
  assert jnp.dtype(bit.dtype) == want[0]
