"""docs/finetuning.md's commands in process, on a tiny folder of videos:
prepare, fine-tune from other weights with a new head, evaluate, predict; then the same model
evaluated on the three official splits of a UCF101 stand-in and their mean (tools.split_mean)."""

import functools
import io
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from configs import msca_kv

from msca_jax.configs import validation
from msca_jax import inference, pretrained
from msca_jax.tools import prepare_videos, split_mean
from msca_jax.train import trainer
from tests import helpers
from tests.data import test_datasets

CLASSES = ("ApplyEyeMakeup", "Basketball")   # the UCF101 stand-in's, so one model fits both
TINY = {
    **helpers.TINY_MODEL, "model.variant": "Ti/16", "model.depth": 2, "model.image_size": 32,
    "data.stride": 1, "data.train_short_side_range": (32, 40), "data.eval_short_side": 32,
    "data.eval_clips": 1, "data.eval_crops": 1, "data.val_clips": 1, "data.val_crops": 1,
    "train.batch_size": 8, "train.base_batch_size": 8, "train.grad_accum_steps": 1, "train.num_steps": 2,
    "train.warmup_epochs": 0, "train.checkpoint_every_steps": 2, "train.log_every_steps": 2,
    "train.async_checkpoint": False, "eval.batch_size": 8, "eval.every_epochs": 0,
    "train.trainable": "last:1", "train.layer_decay": 0.8,
}


tiny_config = functools.partial(helpers.tiny_config, TINY, msca_kv, "ucf101")


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _doc_commands(path: str) -> list[str]:
  """The shell commands of the first code block of a Markdown page, continuations joined."""
  with open(path, encoding="utf-8") as f:
    block = f.read().split("```\n", 2)[1]
  lines = [line for line in block.replace("\\\n", " ").splitlines()
           if line.strip() and not line.lstrip().startswith("#")]
  return [" ".join(line.split()) for line in lines]


def _run_command(command: str, replacements) -> str:
  """Runs a documented command on the stand-in paths, with the tiny model sizes appended."""
  for old, new in replacements:
    command = command.replace(old, new)
  argv = shlex.split(command)
  assert argv[:2] == ["python", "-m"], command
  argv[0] = sys.executable
  if argv[2] in ("msca_jax.main", "msca_jax.predict"):
    argv += [f"--config.{k}={v}" for k, v in TINY.items()]
  result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, (argv, result.stdout[-2000:], result.stderr[-4000:])
  return result.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """docs/finetuning.md's four steps, run as written on stand-in videos and paths."""
  root = tmp_path_factory.mktemp("finetune")
  # The videos of step 1: a folder of class folders per split (8 + 4 videos per class is the
  # smallest batch of the 8 fake devices).
  for split, count in (("train", 8), ("validation", 4)):
    for c, name in enumerate(CLASSES):
      for i in range(count):
        test_datasets.write_clip(str(root / "my_videos" / split / name / f"{i}.avi"),
                                 40 + 120 * c + 5 * i, "mpeg4", num_frames=6, fps=25.0)
  # The Kinetics weights of step 2 (a head for another label set: 7 classes).
  other = tiny_config(**{"model.num_classes": 7})
  model = trainer.models.build(other.model)
  params = helpers.init_params(model, helpers.random_clip(frames=4), seed=3)
  pretrained.save_params(str(root / "k400"), params)
  clip = root / "my_videos" / "validation" / CLASSES[1] / "0.avi"
  replacements = [("my_videos/", f"{root}/my_videos/"), ("/data/mine", str(root / "data")), ("/runs/mine", str(root / "run")),
                  ("/runs/k400_msca_kv", str(root / "k400")), ("num_classes=N", f"num_classes={len(CLASSES)}"),
                  ("clip.mp4", str(clip))]
  outputs = [_run_command(command, replacements)
             for command in _doc_commands(os.path.join(ROOT, "docs", "finetuning.md"))]
  config = tiny_config(**{"model.num_classes": len(CLASSES)})
  return root, config, params, outputs


def test_the_readme_fine_tunes_with_the_documented_command():
  """The README's fine-tuning command is step 2 of docs/finetuning.md, which `run` runs."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  shown = [" ".join(block.replace("\\\n", " ").split()) for block in readme.split("\n\n")
           if "msca_jax.main --config=configs/msca_kv.py:ucf101" in block]
  assert len(shown) == 1 and shown[0] in _doc_commands(os.path.join(ROOT, "docs", "finetuning.md"))


def test_train_evaluate_predict(run):
  root, config, init_params, outputs = run
  assert len(outputs) == 5  # prepare twice, train, evaluate, predict
  report = json.loads((root / "run" / "eval" / "test_step2" / "validation_metrics.json").read_text())
  assert report["num_videos"] == 8 and report["split"] == "validation"
  # trainable='last:1': block 0 and the embeddings are exactly the initial weights.
  trained = traverse_util.flatten_dict(inference.load_params(config, str(root / "run")), sep="/")
  start = traverse_util.flatten_dict(init_params, sep="/")
  for name, value in trained.items():
    if name.startswith(("Transformer/encoderblock_0/", "embedding/", "cls")):
      assert np.asarray(value).tobytes() == np.asarray(start[name]).tobytes(), name
  assert not np.array_equal(trained["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"],
                            start["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"])
  # 4. predict: step 4 names no split, so the class names and the decoding are the ones the
  # checkpoint recorded of its training data, not the :ucf101 recipe's test1 split.
  predicted = outputs[-1]
  manifest = json.loads((root / "data" / "train.manifest.json").read_text())
  assert f"classes    2, recorded in checkpoint {root / 'run'}" in predicted, predicted
  assert f"short side {manifest['settings']['short_side']}," in predicted, predicted
  top = [line.split()[1] for line in predicted.splitlines() if line.startswith("  1. ")
         or line.startswith("  2. ")]
  assert sorted(top) == sorted(CLASSES)


def test_three_official_splits_and_their_mean(run):
  root, config, _, _ = run
  ann, videos = test_datasets.make_ucf101(str(root / "ucf"))
  prepare_videos.prepare_dataset("ucf101", ann, videos, str(root / "ucf_frames"), short_side=32,
                                 workers=0, progress_stream=io.StringIO())
  workdirs = []
  for n in (1, 2, 3):
    # One command per split: main --mode=evaluate with --config.data.eval_split=testN.
    split = tiny_config(**{"data.path": str(root / "ucf_frames"), "data.eval_split": f"test{n}",
                           "model.num_classes": 2,
                           "init.checkpoint": str(root / "run" / "checkpoints" / "2")})
    workdir = str(root / f"ucf_split{n}")
    validation.validate(split, "evaluate", workdir)
    trainer.run(split, workdir, "evaluate")
    workdirs.append(workdir)
  reports, mean = split_mean.split_mean(workdirs)
  assert [r.split for r in reports] == ["test1", "test2", "test3"]
  assert all(r.num_videos == 2 for r in reports)
  for name in split_mean.METRICS:
    assert mean[name] == pytest.approx(sum(r.metrics[name] for r in reports) / 3)
  table = split_mean.format_table(reports, mean).splitlines()
  assert table[-1].startswith("mean")
  # Fresh workdirs evaluating config.init's weights: named by their source and its step, not step 0.
  source = str(root / "run" / "checkpoints" / "2")
  assert all(r.weights == source and r.step == 2 for r in reports)
  assert all(line.endswith(f"{w} (weights {source}, step 2)") for line, w in zip(table[1:4], workdirs))
  report = json.loads((root / "ucf_split1" / "eval" / "test_step2" / "test1_metrics.json").read_text())
  assert report["protocol"]["weights"] == source and report["protocol"]["step"] == 2
  assert not (root / "ucf_split1" / "eval" / "test_step0").exists()


def _report(root, name, split, step, top1, top5, mca, protocol=None):
  directory = root / name / "eval" / f"test_step{step}"
  directory.mkdir(parents=True)
  (directory / f"{split}_metrics.json").write_text(json.dumps(
      {"split": split, "num_videos": 10, "protocol": protocol or {"step": step},
       "metrics": {"top1": top1, "top5": top5, "mean_class_accuracy": mca}}))
  return str(root / name)


def test_split_mean_by_hand(tmp_path, capsys):
  a = _report(tmp_path, "a", "test1", 5, 0.50, 0.90, 0.40)
  _report(tmp_path, "a", "test1", 2, 0.0, 0.0, 0.0)   # an older step: not read
  b = _report(tmp_path, "b", "test2", 5, 0.60, 1.00, 0.55)
  c = _report(tmp_path, "c", "test3", 7, 0.70, 0.80, 0.70)
  _, mean = split_mean.split_mean([a, b, c])
  assert mean == pytest.approx({"top1": 0.60, "top5": 0.90, "mean_class_accuracy": 0.55})
  assert split_mean.main(["split_mean", a, b, c]) == 0
  assert capsys.readouterr().out.splitlines()[-1].split() == ["mean", "60.00", "90.00", "55.00"]
  d = _report(tmp_path, "d", "test2", 1, 0.1, 0.1, 0.1)
  assert split_mean.main(["split_mean", a, b, d]) == 2
  assert "both evaluated on split 'test2'" in capsys.readouterr().err
  assert split_mean.main(["split_mean", a, str(tmp_path / "none")]) == 2
  assert capsys.readouterr().err.strip().count("\n") == 0
  # Weights from elsewhere (config.init): a training step of ours, or a file without one.
  e = _report(tmp_path, "e", "test2", 7, 0.6, 1.0, 0.55, {"step": 7, "weights": "/runs/a/checkpoints/7"})
  f = _report(tmp_path, "f", "test3", 0, 0.7, 0.8, 0.70, {"step": None, "weights": "/w/vit.npz"})
  assert split_mean.main(["split_mean", a, e, f]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[1].endswith(f"{a} (step 5)") and lines[2].endswith(f"{e} (weights /runs/a/checkpoints/7, step 7)")
  assert lines[3].endswith(f"{f} (weights /w/vit.npz)")
