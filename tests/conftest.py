"""Test-wide settings: 8 fake CPU devices, a persistent JAX compilation cache and quiet TensorFlow."""

import os

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".jax_cache"))
# Every compilation is cached: the subprocess tests then reuse what the in-process ones compiled.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# 8 fake CPU devices, so sharded runs can be compared with single-device runs; on a GPU or TPU
# host too (the suite is the CPU's: the accelerators are measured by benchmarks/).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# The tests compile hundreds of tiny programs and run each a few times: LLVM's optimisation of the
# generated code costs more than it saves (a third of the suite's time). XLA's own passes, the
# HLO and the floating-point semantics are unchanged; the subprocesses inherit the flag.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"


def pytest_sessionstart(session):
  """The sharded tests compare 8 devices with one: the 8 fake CPU devices above must be what JAX
  runs on (a test that needs them assumes them, rather than skipping)."""
  del session
  import jax  # noqa: PLC0415  (after XLA_FLAGS is set)

  if jax.device_count() != 8:
    pytest.exit(f"the tests run on 8 fake CPU devices, JAX has {jax.device_count()} "
                f"{jax.default_backend()} device(s): run them with JAX_PLATFORMS=cpu and without "
                f"another --xla_force_host_platform_device_count in XLA_FLAGS",
                returncode=pytest.ExitCode.USAGE_ERROR)
