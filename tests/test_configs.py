"""Config files: they load without JAX or TensorFlow, and each default lives in one place."""

import glob
import os
import subprocess
import sys
import textwrap

import pytest

from msca_jax import configs, defaults, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = sorted(os.path.splitext(os.path.basename(p))[0]
                  for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                  if os.path.basename(p) != "__init__.py")


def _load(variant, arg=None):
  module = __import__(f"configs.{variant}", fromlist=["get_config"])
  return module.get_config(arg) if arg else module.get_config()


def test_every_variant_file_is_found():
  assert {"vit", "tokenshift", "msca_kv", "msca_q_patch"} <= set(VARIANTS)
  assert len(VARIANTS) == 16


@pytest.mark.parametrize("arg", [None, "demo", "clip,ssv2"])
def test_each_file_is_the_packages_variant(arg):
  """configs/<variant>.py (a checkout's --config) and msca_jax.configs.get (an installed package)."""
  assert set(VARIANTS) == set(configs.VARIANTS)
  for variant in VARIANTS:
    assert _load(variant, arg).to_dict() == configs.get(variant, arg).to_dict(), variant
  assert configs.get("msca_q_patch").model.msca_axis == "patch"
  assert configs.get("msca_qv").model.msca_targets == "qv"
  with pytest.raises(ValueError, match="unknown variant 'msca_x'"):
    configs.get("msca_x")


def test_a_wheel_installs_only_msca_jax(tmp_path):
  """configs/ and launch/ stay in the checkout: no top-level package beside other projects'."""
  pytest.importorskip("setuptools")
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
      import setuptools, sys
      sys.argv = ["setup.py", "-q", "build_py", "--build-lib", {str(tmp_path)!r}]
      setuptools.setup()
      """)], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert sorted(os.listdir(tmp_path)) == ["msca_jax"]
  assert os.path.exists(tmp_path / "msca_jax" / "configs" / "recipe.py")


def test_loading_a_config_imports_neither_jax_nor_tensorflow():
  # A fresh process: this one has imported JAX already.
  code = textwrap.dedent(f"""
      import importlib, sys
      for variant in {VARIANTS!r}:
        module = importlib.import_module("configs." + variant)
        module.get_config()
        module.get_config("demo")
      import msca_jax.configs
      msca_jax.configs.get("msca_kv", "clip,ssv2")
      heavy = sorted(m for m in ("jax", "jaxlib", "flax", "tensorflow") if m in sys.modules)
      assert not heavy, heavy
      print("ok", len({VARIANTS!r}))
      """)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["ok", str(len(VARIANTS))]


@pytest.mark.parametrize("arg", [None, "demo"])
def test_a_missing_shift_div_takes_the_configs_default(arg):
  for variant in VARIANTS:
    m = _load(variant, arg).model
    assert m.shift_div == (defaults.SHIFT_DIV[m.name] if arg is None or m.name != "msca" else 4)
    without = {k: v for k, v in m.items() if k != "shift_div"}
    if arg is None or m.name != "msca":   # the demo's MSCA moves one of its 4 heads instead
      assert models.temporal_mixing(without) == models.temporal_mixing(m), variant


def test_msca_moves_one_head_each_way_at_b16_and_in_the_demo():
  b16_heads = models.VARIANTS["B"][2]
  assert defaults.msca_shift_div(b16_heads) == defaults.SHIFT_DIV["msca"]
  for arg in (None, "demo"):
    m = _load("msca_kv", arg).model
    arch = models.architecture(m)
    moved = models.moved_fraction(models.temporal_mixing(m), arch) * arch["num_heads"] / 2
    assert moved == defaults.MSCA_HEADS_EACH_WAY == 1, arg
  # TokenShift moves a quarter of the CLS channels each way, demo or not.
  for arg in (None, "demo"):
    m = _load("tokenshift", arg).model
    assert models.moved_fraction(models.temporal_mixing(m), models.architecture(m)) == 0.5
