"""The paper's Kinetics-400 setting (docs/recipe.md), shared by every variant.

Each variant (msca_jax/configs/__init__.py) sets only its model fields; everything
else (data, optimiser, evaluation) is defined once, here.

Config arguments (`--config=configs/msca_kv.py:ARG[,ARG...]`, applied left to right):
  (none)  ViT-B/16, 8x32 clips at 224 px, Kinetics-400, the paper's recipe.
  demo    a small model on the built-in synthetic dataset that trains on a CPU
          in minutes.
  k400    the default (Kinetics-400); names the dataset and changes nothing else.
  ssv2    Something-Something v2 (TimeSformer's recipe: 8 uniform frames, no flips).
  ucf101  UCF101, official split 1 (VideoMAE's ViT-B/16 fine-tuning recipe).
  hmdb51  HMDB51, official split 1 (the UCF101 recipe with 51 classes).
  clip    the CLIP ViT-B/16 backbone (ln_pre, QuickGELU, LayerNorm eps 1e-5, no patch
          bias, the 512-wide proj before the head, CLIP's pixel mean and std), for
          config.init.weights = an OpenAI / open_clip / Hugging Face CLIP checkpoint.
The dataset recipes do not combine with demo or with each other; docs/datasets.md gives each
value's source. `clip` combines with any of them (`:clip,ssv2`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Neither imports JAX or TensorFlow: loading a config stays cheap (tests/test_configs.py).
from msca_jax import defaults
from msca_jax.data import synthetic


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
  m.shift_div = defaults.SHIFT_DIV.get(name)  # TokenShift 4, MSCA 12 (msca_jax/defaults.py)
  m.msca_targets = "kv"              # any of q, k, v, qk, qv, kv, qkv
  m.msca_axis = "head"               # 'head' (the paper) | 'patch' (our interpretation)
  m.boundary = "zero"                # 'zero' (reference) | 'circular'
  m.dtype = "float32"                # compute dtype: 'float32' | 'bfloat16'; params stay fp32
  m.remat = False
  m.remat_policy = "nothing_saveable"  # a jax.checkpoint_policies name
  m.attention_impl = "auto"          # 'auto' (cuDNN's fused kernel on GPU in bf16/fp16, else XLA) | 'xla' | 'cudnn'
  m.dropout_rate = 0.0
  m.attention_dropout_rate = 0.0
  m.drop_path_rate = 0.0
  m.head_zeroinit = True
  m.backbone = "vit"                 # 'vit' (Google's ViT) | 'clip' (CLIP's vision tower: the `clip` argument)
  m.proj_dim = 0                     # clip: width of the bias-free `proj` before the head; 0: no proj
  m.layer_norm_eps = 1e-6            # CLIP: 1e-5
  m.mlp_activation = "gelu"          # 'gelu' (exact) | 'quick_gelu' (OpenAI CLIP)
  # Set through config.data.pixel_mean / pixel_std, which refer to these (the model normalises).
  m.pixel_mean = (0.5, 0.5, 0.5)
  m.pixel_std = (0.5, 0.5, 0.5)
  m.update(overrides)
  return m


def get_config(model_name: str, arg: str | None = None, **model_overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model_config(model_name, **model_overrides)
  m = config.model

  # Input (docs/recipe.md): 8 frames at stride 32 of 25 fps video; evaluation 10 clips x 3 crops.
  config.data = d = ml_collections.ConfigDict()
  d.dataset = "k400"                 # which recipe's dataset: 'k400' | 'ssv2' | 'ucf101' | 'hmdb51'
  d.source = "frames"                # 'frames' folders (random access) | 'dmvr' shards | 'tfds' | 'synthetic'
  d.path = ""                        # frame-folder root, DMVR shard directory, or the TFDS data_dir
  d.tfds_name = "kinetics/400"
  d.train_split = "train"
  d.eval_split = "validation"
  # Frame folders (docs/data.md): lists default to PATH/SPLIT.txt; the reference code's own lists
  # and frame names work as they are (FRAME_REPO = path, TRN_LIST_TXT, FRAME_FORMAT).
  d.train_list = ""
  d.eval_list = ""
  d.frame_pattern = "img_{:05d}.jpg"  # ignored when PATH/SPLIT.manifest.json (ours) names it
  d.frame_first_index = 1
  d.check_frame_counts = True        # each clip checks its folder's frame count (one listing call)
  d.num_frames = m.get_ref("num_frames")
  d.image_size = m.get_ref("image_size")
  d.sampling = "dense"               # 'dense' (T frames at a stride) | 'uniform' (TSN segments)
  d.clip_positions = "reference"     # dense clip starts: 'reference' (data/dataset.py's rules) | 'centred'
  d.stride = 32
  d.fps = 25                         # the frame rate the data was prepared at (prepare_videos --fps)
  d.train_short_side_range = (224, 330)   # random short side in [lo, hi), then a random crop
  d.flip_prob = 0.5
  d.color_prob = 0.1                 # brightness, saturation, gamma, hue: each with this probability
  d.randaugment_layers = 0           # RandAugment hook; 0 is off (the recipe)
  d.randaugment_magnitude = 9.0
  d.mixup_alpha = 0.0                # batch-level mixup / cutmix hooks; 0 is off (the recipe)
  d.cutmix_alpha = 0.0
  # Where training views are finished: 'device' resizes, flips and colours the decoded crop windows
  # in the train step (the host only decodes); 'host' does all of it in tf.data; 'auto' is
  # 'device' unless RandAugment or mixup / CutMix (host-only hooks) are on.
  d.augment_on = "auto"
  d.device_window = 0                # crop windows are padded to this side; 0: from the stored short side
  d.eval_short_side = 224
  d.eval_clips = 10                  # test protocol: 10 clips x 3 crops
  d.eval_crops = 3                   # 3: left, centre, right along the long side; 1: centre
  d.val_clips = 1                    # validation during training: 1 x 3 views
  d.val_crops = 3
  d.shuffle_buffer = 4096            # record sources only: whole serialised videos in host RAM
  d.deterministic = True             # reproducible order (and exact resume); False is faster
  d.prefetch = 2
  # Pixels x in [0, 1] reach the patch embedding as (x - mean) / std, per RGB channel; the
  # default is ViT's [-1, 1]. The model applies them (to uint8 and to [-1, 1] float batches alike).
  d.pixel_mean = m.get_ref("pixel_mean")
  d.pixel_std = m.get_ref("pixel_std")
  d.dtype = "uint8"                  # of the clips handed to JAX: 'uint8' (mapped to [-1, 1] on the device) | 'float32' | 'bfloat16'
  # The built-in dataset (config.data.source='synthetic'): written once as frame folders.
  d.synthetic = ml_collections.ConfigDict()
  d.synthetic.seed = 0
  d.synthetic.train_size = 4096
  d.synthetic.eval_size = 512
  d.synthetic.video_frames = 16
  d.synthetic.size = 32
  d.synthetic.dir = ""               # '' : $MSCA_JAX_CACHE/synthetic or ~/.cache/msca_jax/synthetic

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
  config.train.schedule = "step"     # 'step' (x lr_decay_factor at lr_decay_epochs) | 'cosine' (to 0)
  config.train.lr_decay_epochs = (10, 15)
  config.train.lr_decay_factor = 0.1
  config.train.warmup_epochs = 0
  config.train.grad_clip_norm = 1.0
  config.train.label_smoothing = 0.1
  # Fine-tuning (docs/datasets.md): 'all' | 'head' (a linear probe of the head alone) |
  # 'last:K' (last K blocks, final norm, head); frozen params never change. layer_decay < 1: block i of L learns at
  # decay^(L - i) of the rate, the embeddings at decay^(L + 1); 1.0 is off.
  config.train.trainable = "all"
  config.train.layer_decay = 1.0
  config.train.seed = 0
  config.train.num_steps = -1        # train steps (micro-batches); -1: num_epochs of the train split
  config.train.log_every_steps = 50  # progress line, TensorBoard scalars, NaN/Inf check
  config.train.checkpoint_every_steps = 1000
  config.train.max_checkpoints = 3
  config.train.async_checkpoint = True

  # Evaluation: 'val' (config.data.val_*) during training, 'test' (config.data.eval_*) at the end.
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8         # videos per global batch, each with all its views
  config.eval.every_epochs = 1       # validation during training; 0 turns it off

  # Devices: data parallel over everything by default; see msca_jax/train/mesh.py.
  config.mesh = defaults.mesh_config()

  config.init = ml_collections.ConfigDict()
  config.init.weights = ""          # any file pretrained.load reads (.npz, .safetensors, .bin/.pth): docs/weights.md
  config.init.vit_npz = ""          # Google ViT .npz (i21k / AugReg / big_vision)
  config.init.checkpoint = ""       # tools.convert_torch output, or a training workdir of ours
  config.init.load_head = True      # False: the head starts at zero (another label set)
  config.init.weights_key = ""      # a training checkpoint's entry for config.init.weights: '' the first of
                                    # pretrained.STATE_DICT_KEYS (EMA first; docs/weights.md)

  for name in parse_arguments(arg):
    ARGUMENTS[name](config)
  return config


def parse_arguments(arg: str | None) -> list[str]:
  """'clip,ssv2' -> ['clip', 'ssv2']; ValueError names an unknown, repeated or clashing argument."""
  names = [a.strip() for a in (arg or "").split(",") if a.strip()]
  for name in names:
    if name not in ARGUMENTS:
      raise ValueError(f"unknown config argument {name!r}: expected nothing or a comma-separated "
                       f"list of {', '.join(repr(k) for k in ARGUMENTS)}")
  if len(set(names)) != len(names):
    raise ValueError(f"config argument {arg!r} names an argument twice")
  recipes = [n for n in names if n in DATASET_RECIPES]
  if len(recipes) > 1:
    raise ValueError(f"config argument {arg!r} names two datasets ({', '.join(recipes)}): "
                     "expected at most one")
  if recipes and "demo" in names:
    # demo replaces the data with the synthetic set, which would undo the recipe.
    raise ValueError(f"config arguments {recipes[0]!r} and 'demo' do not combine: demo trains on "
                     "the built-in synthetic dataset; shrink the model with --config.model.* instead")
  return names


def _demo(config: ml_collections.ConfigDict) -> None:
  """A model small enough to learn the synthetic temporal dataset on 2 CPU cores."""
  m = config.model
  m.variant = "Ti/8"
  m.width, m.depth, m.num_heads, m.mlp_dim = 64, 4, 4, 128
  m.num_frames, m.image_size = 8, 32
  m.head_zeroinit = False
  if m.name == "msca":
    # With 4 heads the default 12 would move none: keep the released code's one head each way.
    m.shift_div = defaults.msca_shift_div(m.num_heads)
  m.num_classes = len(synthetic.CLASSES)
  d = config.data
  d.source = "synthetic"
  d.stride = 1
  d.train_short_side_range = (32, 40)
  d.eval_short_side = 32
  d.flip_prob = 0.0   # a mirror turns move_left into move_right: it would corrupt the labels
  d.eval_clips = 2
  d.eval_crops = 1
  d.val_clips, d.val_crops = 1, 1
  d.shuffle_buffer = 1024
  config.train.optimizer = "adamw"
  config.train.base_lr = 1e-3
  config.train.base_batch_size = 32
  config.train.batch_size = 32
  config.train.grad_accum_steps = 1
  config.train.num_epochs = 10
  config.train.schedule = "cosine"
  config.train.lr_decay_epochs = ()
  config.train.warmup_epochs = 1
  config.train.weight_decay = 1e-4
  config.train.log_every_steps = 20
  config.train.checkpoint_every_steps = 200
  config.eval.batch_size = 64
  config.eval.every_epochs = 5


def _k400(config: ml_collections.ConfigDict) -> None:
  """The paper's Kinetics-400 recipe, which get_config builds already."""
  config.data.dataset = "k400"


def _ssv2(config: ml_collections.ConfigDict) -> None:
  """Something-Something v2 after TimeSformer's ViT-B/16 recipe (docs/datasets.md)."""
  m, d, t = config.model, config.data, config.train
  d.dataset = "ssv2"
  m.num_classes = 174
  m.num_frames = 8
  d.sampling = "uniform"             # TSN segments over the whole (short) video
  d.fps = 12                         # the videos' own rate: prepare_videos keeps every frame
  d.flip_prob = 0.0                  # a mirror swaps left and right, which its classes name
  d.train_split, d.eval_split = "train", "validation"
  d.eval_clips, d.eval_crops = 1, 3
  d.val_clips, d.val_crops = 1, 3
  t.optimizer, t.momentum, t.weight_decay = "sgd", 0.9, 1e-4
  t.base_lr, t.base_batch_size = 0.005, 64
  t.num_epochs, t.schedule, t.lr_decay_epochs, t.lr_decay_factor = 15, "step", (11, 14), 0.1
  t.warmup_epochs = 0


def _small_dataset(config: ml_collections.ConfigDict, dataset: str, num_classes: int,
                   num_epochs: int) -> None:
  """UCF101 / HMDB51 after VideoMAE's ViT-B/16 UCF101 fine-tuning script (docs/datasets.md)."""
  m, d, t = config.model, config.data, config.train
  d.dataset = dataset
  m.num_classes = num_classes
  m.num_frames = 16
  m.drop_path_rate = 0.2
  d.sampling, d.stride = "dense", 4
  d.flip_prob = 0.5
  d.train_split, d.eval_split = "train1", "test1"   # prepare_videos --dataset writes train1..test3
  d.eval_clips, d.eval_crops = 5, 3
  d.val_clips, d.val_crops = 1, 3
  t.optimizer, t.weight_decay = "adamw", 0.05
  t.base_lr, t.base_batch_size = 5e-4, 256
  t.layer_decay = 0.7
  t.num_epochs, t.schedule, t.lr_decay_epochs = num_epochs, "cosine", ()
  t.warmup_epochs = 5                # ours


def _ucf101(config: ml_collections.ConfigDict) -> None:
  _small_dataset(config, "ucf101", 101, num_epochs=100)


def _hmdb51(config: ml_collections.ConfigDict) -> None:
  _small_dataset(config, "hmdb51", 51, num_epochs=50)   # 50 epochs: ours


CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def _clip(config: ml_collections.ConfigDict) -> None:
  """CLIP ViT-B/16's vision tower as the backbone (OpenAI's weights: QuickGELU)."""
  m = config.model
  m.backbone = "clip"
  m.variant = "B/16"
  m.width = m.depth = m.num_heads = m.mlp_dim = m.patch_size = None
  m.proj_dim = 512
  m.layer_norm_eps = 1e-5
  m.mlp_activation = "quick_gelu"
  config.data.pixel_mean = CLIP_PIXEL_MEAN
  config.data.pixel_std = CLIP_PIXEL_STD


# Each config argument is a function that edits the whole config in place.
ARGUMENTS = {
    "demo": _demo,
    "k400": _k400,
    "ssv2": _ssv2,
    "ucf101": _ucf101,
    "hmdb51": _hmdb51,
    "clip": _clip,
}
DATASET_RECIPES = ("k400", "ssv2", "ucf101", "hmdb51")
