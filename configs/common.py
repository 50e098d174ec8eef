"""The paper's Kinetics-400 setting (SPEC.md section 5), shared by every variant.

Each variant file calls `get_config(...)` with its model fields; everything
else (data, optimiser, evaluation) is defined once, here. Fields that the
current trainer does not read yet are the recipe's values, kept so that later
work extends this one place.

Config arguments (`--config=configs/msca_kv.py:ARG`):
  (none)  ViT-B/16, 8x32 clips at 224 px, Kinetics-400, the paper's recipe.
  demo    a small model on the built-in synthetic dataset that trains on a CPU
          in minutes.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Shift folds used by the reference code: TokenShift moves C/4 of the CLS
# channels each way; the released MSCA config moves 12 // 12 = 1 head each way.
TOKENSHIFT_SHIFT_DIV = 4
MSCA_SHIFT_DIV = 12


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.name = name                      # 'vit' | 'tokenshift' | 'msca'
  m.variant = "B/16"                 # 'Ti/16' | 'S/16' | 'B/16' | 'L/16' (any patch size)
  # Custom sizes override the variant (small test models); None keeps the preset.
  m.width = config_dict.placeholder(int)
  m.depth = config_dict.placeholder(int)
  m.num_heads = config_dict.placeholder(int)
  m.mlp_dim = config_dict.placeholder(int)
  m.patch_size = config_dict.placeholder(int)
  m.num_classes = 400
  m.num_frames = 8
  m.image_size = 224
  m.shift_div = MSCA_SHIFT_DIV if name == "msca" else TOKENSHIFT_SHIFT_DIV
  m.msca_targets = "kv"              # any of q, k, v, qk, qv, kv, qkv
  m.msca_axis = "head"               # 'head' (the paper) | 'patch' (our interpretation)
  m.boundary = "zero"                # 'zero' (reference) | 'circular'
  m.dtype = "float32"                # compute dtype: 'float32' | 'bfloat16'; params stay fp32
  m.remat = False
  m.remat_policy = "nothing_saveable"  # a jax.checkpoint_policies name
  m.attention_impl = "auto"          # 'auto' (cuDNN on GPU in bf16/fp16, else XLA) | 'xla' | 'cudnn'
  m.dropout_rate = 0.0
  m.attention_dropout_rate = 0.0
  m.drop_path_rate = 0.0
  m.head_zeroinit = True
  m.update(overrides)
  return m


def get_config(model_name: str, arg: str | None = None, **model_overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config(model_name, **model_overrides)
  m = config.model

  # Input: 8 frames at stride 32 of 25 fps video (SPEC 5); evaluation 10 clips x 3 crops.
  config.data = ml_collections.ConfigDict()
  config.data.dataset = "kinetics400"
  config.data.num_frames = m.get_ref("num_frames")
  config.data.stride = 32
  config.data.fps = 25
  config.data.image_size = m.get_ref("image_size")
  config.data.train_short_side_range = (224, 330)   # random short side, then a 224 crop
  config.data.eval_short_side = 224
  config.data.eval_clips = 10
  config.data.eval_crops = 3                         # left, centre, right
  config.data.val_clips = 1                          # during training: 1 x 3 views
  config.data.val_crops = 3

  # Optimisation: SGD, lr 0.1 per 420 clips (42 x 10 accumulation), x0.1 at 10 and 15 of 18 epochs.
  config.train = ml_collections.ConfigDict()
  config.train.optimizer = "sgd"
  config.train.momentum = 0.9
  config.train.weight_decay = 0.0
  config.train.base_lr = 0.1
  config.train.base_batch_size = 420
  config.train.batch_size = 42
  config.train.grad_accum_steps = 10
  config.train.num_epochs = 18
  config.train.lr_decay_epochs = (10, 15)
  config.train.lr_decay_factor = 0.1
  config.train.warmup_epochs = 0
  config.train.grad_clip_norm = 1.0
  config.train.label_smoothing = 0.1
  config.train.seed = 0

  config.init = ml_collections.ConfigDict()
  config.init.vit_npz = ""          # Google ViT .npz (i21k / AugReg / big_vision)
  config.init.checkpoint = ""       # converted PyTorch checkpoint (tools.convert_torch)

  if arg == "demo":
    _demo(config)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}: expected nothing or 'demo'")
  return config


def _demo(config: ml_collections.ConfigDict) -> None:
  """A model small enough to learn the synthetic temporal dataset on 2 CPU cores."""
  m = config.model
  m.variant = "Ti/8"
  m.width, m.depth, m.num_heads, m.mlp_dim = 64, 4, 4, 128
  m.num_frames, m.image_size = 8, 32
  m.head_zeroinit = False
  if m.name == "msca":
    m.shift_div = 4  # 4 heads: one each way, as the B/16 default shifts 1 of 12
  config.data.dataset = "synthetic"
  config.data.stride = 1
  config.train.optimizer = "adamw"
  config.train.base_lr = 1e-3
  config.train.base_batch_size = 32
  config.train.batch_size = 32
  config.train.grad_accum_steps = 1
  config.train.num_epochs = 10
  config.train.lr_decay_epochs = ()
  config.train.warmup_epochs = 1
  config.train.weight_decay = 1e-4
