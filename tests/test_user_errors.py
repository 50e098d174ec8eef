"""User errors at the command line: one line on stderr naming the field or file, exit status 2.

Everything here fails before JAX compiles anything: the flags, the config validation
(msca_jax.configs.validation.validate) and the refusal of unusable files. Bugs keep their tracebacks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from absl import app, flags
from ml_collections import config_flags

from configs import msca_kv, vit

from msca_jax.configs import validation
from msca_jax import cli, pretrained
from msca_jax.data import frames, synthetic
from msca_jax.errors import UserError
from msca_jax.tools import convert_torch
from msca_jax.data.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "vit.py")
# absl's log line prefix, and the line absl's C++ logging prints before TensorFlow's first native
# log line (TensorFlow 2.21 prints it on import whatever TF_CPP_MIN_LOG_LEVEL says).
LOG_LINE = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl::InitializeLog\(\))")
# torch's UnpicklingError text for a file with a code object (torch 2.x): the advice must not reach the user.
TORCH_REFUSAL = (
    "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` "
    "argument in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set "
    "to `False` will likely succeed, but it can result in arbitrary code execution. Do it only if you "
    "got the file from a trusted source.\n\n\nTrying to load unsupported GLOBAL posix.system whose "
    "module posix is blocked.\n\nCheck the documentation of torch.load to learn more.")


def _program(*argv: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=dict(os.environ),
                        capture_output=True, text=True, timeout=120, check=False)


def _assert_one_line(result: subprocess.CompletedProcess, message: str) -> str:
  """Exit status 2; the only stderr line that is not a log line is `error: ...message...`."""
  lines = [line for line in result.stderr.splitlines() if not LOG_LINE.match(line)]
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  return lines[0]


# ----------------------------------------------------------------------------- flags

def test_unknown_fields_are_named_with_what_is_there():
  config = vit.get_config("demo")
  assert cli.unknown_field(config, "config", "train.batch_size") is None
  assert cli.unknown_field(config, "config", "train.foo") == (
      f"unknown field config.train.foo (config.train has: {', '.join(sorted(config.train))})")
  assert cli.unknown_field(config, "config", "train.bach_size") == (
      "unknown field config.train.bach_size (did you mean config.train.batch_size or "
      "config.train.base_batch_size?)")
  assert cli.unknown_field(config, "config", "trian.foo") == (
      "unknown field config.trian (did you mean config.train?)")
  assert "config.train.batch_size is a int" in cli.unknown_field(config, "config", "train.batch_size.x")


@pytest.mark.parametrize("argv, message", [
    ([f"--config={CONFIG}:demo", "--config.model.varaint=B/16"],
     "unknown field config.model.varaint (did you mean config.model.variant?)"),
    ([f"--config={CONFIG}:demo", "--config.trian.batch_size=1"],
     "unknown field config.trian (did you mean config.train?)"),
    (["--config=configs/nope.py"], "--config=configs/nope.py: no config file 'configs/nope.py' "
                                   "(expected a Python file with get_config()"),
    (["--config", "configs/nope.py:demo", "--config.train.batch_size=1"],
     "--config=configs/nope.py:demo: no config file 'configs/nope.py'"),
    ([f"--config={CONFIG}:bogus"],
     f"flag --config={CONFIG}:bogus: unknown config argument 'bogus': expected nothing or a comma-separated list of "),
    ([f"--config={CONFIG}:demo", "--config.train.batch_size=abc"],
     "flag --config.train.batch_size=abc: invalid literal for int()"),
    ([f"--config={CONFIG}:demo", "--wokdir=/tmp/x"], "Unknown command line flag 'wokdir'"),
])
def test_flag_mistakes_are_one_line(argv, message, capsys):
  argv = ["prog", *argv]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_flags(argv, flag_values)
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err, err


def test_flag_mistakes_in_the_programs_are_one_line(tmp_path):
  result = _program("msca_jax.main", f"--config={CONFIG}:demo", "--config.train.foo=1",
                    f"--workdir={tmp_path}")
  line = _assert_one_line(result, "error: unknown field config.train.foo (config.train has: "
                                  "async_checkpoint, base_batch_size, base_lr, batch_size, ")
  assert result.stderr == line + "\n"  # nothing else: no log line, no usage text
  result = _program("msca_jax.predict", f"--config={CONFIG}:demo", "--config.data.foo=1",
                    f"--checkpoint={tmp_path}", f"--video={tmp_path}/clip.mp4")
  _assert_one_line(result, "error: unknown field config.data.foo (config.data has: augment_on, ")


# ----------------------------------------------------------------------------- main()

def test_guard_maps_only_user_errors(capsys):
  def failing(error):
    def main(argv):
      raise error
    return cli.guard(main)

  for error in (UserError("config.x: expected y\nsecond line"), DataError("data file f"),
                app.UsageError("--workdir is required")):
    with pytest.raises(SystemExit) as exit_info:
      failing(error)(["prog"])
    assert exit_info.value.code == cli.EXIT_USER_ERROR == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err == f"error: {cli.one_line(error)}\n"
  assert cli.one_line(UserError("a\n  b")) == "a b"
  with pytest.raises(ZeroDivisionError):  # our bugs keep their tracebacks
    failing(ZeroDivisionError("bug"))(["prog"])
  with pytest.raises(ValueError):
    failing(ValueError("a bug, not a config check"))(["prog"])


def test_config_mistake_in_main_is_one_line_before_the_config_dump(tmp_path):
  result = _program("msca_jax.main", f"--config={CONFIG}:demo", "--config.train.batch_size=0",
                    f"--workdir={tmp_path}/run")
  _assert_one_line(result, "error: config.train.batch_size = 0: expected > 0")
  assert "config:" not in result.stderr and not os.path.exists(tmp_path / "run")


# ----------------------------------------------------------------------------- validate(config)

@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("MSCA_JAX_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


def _demo(**overrides):
  config = msca_kv.get_config("demo")
  config.update_from_flattened_dict(overrides)
  return config


def test_the_demo_config_passes_and_writes_no_data(cache):
  validation.validate(_demo())
  validation.validate(_demo(), "evaluate")
  assert os.listdir(cache / "synthetic") == []


@pytest.mark.parametrize("overrides, message", [
    ({"train.batch_size": 0}, "config.train.batch_size = 0: expected > 0"),
    ({"eval.batch_size": 0}, "config.eval.batch_size = 0: expected a positive integer"),
    ({"train.batch_size": 12}, "config.train.batch_size = 12 must be divisible by the 8 batch "
                               "shards"),  # the 8 fake devices of tests/conftest.py
    ({"model.variant": "B/17"}, "config.model.variant = 'B/17': patch size 17 does not divide "
                                "config.model.image_size = 32"),
    ({"model.variant": "X/16"}, "config.model.variant: expected '<Ti|S|B|L>/<patch size>'"),
    ({"model.msca_targets": "z"}, "config.model.msca_targets"),
    ({"data.sampling": "sparse"}, "config.data.sampling must be one of"),
    ({"data.source": "frames"}, "config.data.path is empty: expected the frame-folder root"),
    ({"data.source": "dmvr", "data.path": "/nonexistent/k400"},
     "config.data.path = '/nonexistent/k400': no such directory (expected the DMVR shard directory)"),
    ({"init.vit_npz": "/nonexistent/vit.npz"}, "config.init.vit_npz = '/nonexistent/vit.npz': no such"),
])
def test_config_mistakes_name_the_field(cache, overrides, message):
  with pytest.raises(UserError) as error:
    validation.validate(_demo(**overrides))
  assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_splits_are_named(tmp_path, cache):
  root = tmp_path / "frames"
  root.mkdir()
  frames.write_list(frames.list_path(str(root), "train"), [("a", 8, 0)])
  config = _demo(**{"data.source": "frames", "data.path": str(root)})
  message = (f"config.data.eval_split = 'validation': no video list {root}/validation.txt (set "
             "config.data.eval_split to a split that has one, or config.data.eval_list to the list file)")
  for mode in ("evaluate", "train_and_evaluate"):
    with pytest.raises(UserError, match=re.escape(message)):
      validation.validate(config, mode)
  config.data.eval_list = str(root / "val_list.txt")
  with pytest.raises(UserError, match=re.escape(f"config.data.eval_list = '{root}/val_list.txt': no such file")):
    validation.validate(config, "evaluate")
  config = _demo(**{"data.source": "frames", "data.path": str(root), "data.eval_split": "train"})
  with pytest.raises(UserError, match="config.data.train_split = 'trian': no video list"):
    validation.validate(_demo(**{"data.source": "frames", "data.path": str(root), "data.eval_split": "train",
                             "data.train_split": "trian"}))
  validation.validate(config)  # both splits read train.txt: nothing missing

  shards_dir = tmp_path / "shards"
  shards_dir.mkdir()
  with pytest.raises(UserError, match="config.data.eval_split = 'validation': no shards for split "
                                      "'validation' in"):
    validation.validate(_demo(**{"data.source": "dmvr", "data.path": str(shards_dir)}), "evaluate")


def test_evaluate_needs_weights(tmp_path, cache):
  with pytest.raises(UserError, match=re.escape(
      f"--mode=evaluate: {tmp_path} has no finished checkpoint, and config.init names no weights")):
    validation.validate(_demo(), "evaluate", str(tmp_path))
  validation.validate(_demo(), "train_and_evaluate", str(tmp_path))  # training writes them
  (tmp_path / "weights.npz").write_bytes(b"")
  validation.validate(_demo(**{"init.vit_npz": str(tmp_path / "weights.npz")}), "evaluate", str(tmp_path))


def test_npz_with_objects_is_refused_without_numpys_advice(tmp_path):
  path = tmp_path / "objects.npz"
  np.savez(path, a=np.array([{"x": 1}], dtype=object))
  with pytest.raises(pretrained.WeightsError) as error:
    pretrained.read_npz(path)
  assert str(error.value) == (f"{path}: refused: it contains pickled Python objects (object arrays), "
                              "which can run code when loaded; only .npz files of numeric arrays are read")
  assert error.value.__cause__ is None and error.value.__suppress_context__


def _blocked_directory(tmp_path) -> str:
  """A directory that cannot be created, even by root: a file is in the way."""
  (tmp_path / "a_file").write_text("")
  return str(tmp_path / "a_file" / "cache")


def test_unwritable_synthetic_cache_names_the_directory_and_the_variable(tmp_path, monkeypatch):
  blocked = _blocked_directory(tmp_path)
  monkeypatch.setenv("MSCA_JAX_CACHE", blocked)
  with pytest.raises(UserError) as error:
    validation.validate(_demo())
  assert str(error.value).startswith(f"cannot write the synthetic dataset to {blocked}/synthetic (")
  assert str(error.value).endswith("set MSCA_JAX_CACHE (or config.data.synthetic.dir) to a writable "
                                   "directory")
  # No MSCA_JAX_CACHE: the default under HOME is the one named.
  monkeypatch.delenv("MSCA_JAX_CACHE")
  monkeypatch.setenv("HOME", blocked)
  with pytest.raises(UserError, match=re.escape(f"to {blocked}/.cache/msca_jax/synthetic (")):
    validation.validate(_demo())
  with pytest.raises(UserError, match="set config.data.synthetic.dir to a writable directory"):
    validation.validate(_demo(**{"data.synthetic.dir": blocked}))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_cache_with_the_dataset_in_it_is_fine(cache):
  config = _demo()
  root = cache / "synthetic"
  done = root / "seed0-demo" / "DONE.json"
  done.parent.mkdir(parents=True)
  s = config.data.synthetic
  done.write_text(json.dumps({k: s[k] for k in ("seed", "train_size", "eval_size", "video_frames", "size")}
                             | {"version": synthetic.VERSION}))
  os.chmod(root, 0o555)
  try:
    validation.validate(config)
    with pytest.raises(UserError, match=f"cannot write the synthetic dataset to {root} "):
      validation.validate(_demo(**{"data.synthetic.seed": 1}))
  finally:
    os.chmod(root, 0o755)


# ----------------------------------------------------------------------------- convert_torch

def _model_config():
  return vit.get_config("demo").model


def test_convert_torch_without_torch_names_the_extra(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(UserError, match=re.escape("needs PyTorch, which is not installed: install the "
                                                "parity extra (pip install -e '.[parity]')")):
    convert_torch.convert(str(tmp_path / "x.pth"), _model_config(), str(tmp_path / "out"))


def test_convert_torch_refusal_never_repeats_torchs_advice(tmp_path, monkeypatch):
  def load(*args, **kwargs):
    raise pickle.UnpicklingError(TORCH_REFUSAL)
  monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(load=load))
  path = tmp_path / "evil.pth"
  path.write_bytes(b"any")
  with pytest.raises(convert_torch.pretrained.WeightsError) as error:
    convert_torch.convert(str(path), _model_config(), str(tmp_path / "out"))
  message = str(error.value)
  assert message == (f"{path}: refused: it contains pickled Python objects (posix.system), which can "
                     "run code when loaded; only checkpoints of tensors, which "
                     "torch.load(weights_only=True) reads, are converted")
  assert error.value.__cause__ is None and error.value.__suppress_context__  # torch's text is not chained


class _RunsCode:
  """Unpickling this runs a shell command: what a malicious .pth does."""

  def __reduce__(self):
    return (os.system, ("echo unpickled",))


def test_convert_torch_program_refuses_a_malicious_file_in_one_line(tmp_path):
  path = tmp_path / "evil.pth"
  path.write_bytes(pickle.dumps({"state_dict": {"x": _RunsCode()}}))
  result = _program("msca_jax.tools.convert_torch", f"--checkpoint={path}", f"--config={CONFIG}:demo",
                    f"--output={tmp_path}/out")
  if importlib.util.find_spec("torch") is not None:
    message = f"error: {path}: refused: it holds pickled Python objects (code) or is not a PyTorch"
  else:
    message = "needs PyTorch, which is not installed"
  _assert_one_line(result, message)
  assert "False" not in result.stderr and "unpickled" not in result.stdout
  assert not os.path.exists(tmp_path / "out")
