"""msca_jax.host_memory: freed blocks are reused without page faults, from any thread."""

import os
import subprocess
import sys
import textwrap

from absl.testing import absltest

from msca_jax import host_memory

# Allocates, touches and frees a 256 MiB block twice in a worker thread (XLA's step buffers are
# allocated on its threads) and prints the page faults of the second round.
_PROBE = textwrap.dedent("""
    import ctypes, resource, threading
    from msca_jax import host_memory
    print(host_memory.keep_freed_memory())
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 256 << 20
    faults = []
    def rounds():
      for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    thread = threading.Thread(target=rounds)
    thread.start(); thread.join()
    print(faults[1])
""")


def _probe(setting, **environ):
  env = dict(os.environ, **{host_memory.ENV_VAR: setting}, **environ)
  result = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                          check=True)
  state, faults = result.stdout.strip().splitlines()
  return state, int(faults)


@absltest.skipUnless(sys.platform.startswith("linux"), "glibc malloc options")
class KeepFreedMemoryTest(absltest.TestCase):

  def test_a_freed_block_is_reused_without_faults(self):
    state, faults = _probe("keep")
    self.assertIn("kept for reuse", state)
    self.assertLess(faults, 1000)   # 65,536 pages of 4 KiB if the block went back to the OS

  def test_default_leaves_malloc_alone(self):
    state, _ = _probe("default")
    self.assertIn("defaults", state)

  def test_left_alone_when_jax_runs_on_an_accelerator(self):
    state, faults = _probe("keep", JAX_PLATFORMS="cuda,cpu")
    self.assertIn("defaults", state)
    self.assertIn("JAX_PLATFORMS=cuda,cpu", state)
    self.assertGreater(faults, 1000)   # the freed block went back to the OS

  def _with_plugin(self, plugin: str, chip: bool, then: str) -> str:
    """`then`'s output in a process where `plugin` alone looks installed (libtpu, installed or
    not, only when named) and a TPU chip attached or not."""
    env = dict(os.environ, JAX_PLATFORMS="")
    env.pop("JAX_PLATFORMS")
    probe = ("import importlib.util, os, sys; from msca_jax import host_memory; "
             "real = importlib.util.find_spec; "
             f"importlib.util.find_spec = lambda name, *a: object() if name == {plugin!r} else "
             "None if name == 'libtpu' else real(name, *a); "
             f"host_memory.tpu_attached = lambda: {chip}; os.environ.pop('JAX_PLATFORMS', None); "
             + then)
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                            check=True)
    return result.stdout.strip()

  def test_an_installed_accelerator_plugin_means_an_accelerator(self):
    backend = "print(host_memory.accelerator_backend())"
    self.assertEqual(self._with_plugin("libtpu", True, backend), "libtpu")
    self.assertEqual(self._with_plugin("jax_cuda12_plugin", False, backend), "jax_cuda12_plugin")
    # libtpu is also the TPU compiler (docs/tpu_compile.md): without a TPU chip JAX runs on the CPU.
    self.assertEqual(self._with_plugin("libtpu", False, backend), "")
    self.assertEqual(self._with_plugin("nothing", False, backend), "")

  def test_libtpu_without_a_tpu_chip_keeps_jax_on_the_cpu(self):
    platforms = ("host_memory.cpu_unless_tpu_attached(); "
                 "print(os.environ.get('JAX_PLATFORMS', 'unset'))")
    self.assertEqual(self._with_plugin("libtpu", False, platforms), "cpu")
    self.assertEqual(self._with_plugin("libtpu", True, platforms), "unset")
    self.assertEqual(self._with_plugin("nothing", False, platforms), "unset")
    given = ("os.environ['JAX_PLATFORMS'] = 'cpu,tpu'; " + platforms)
    self.assertEqual(self._with_plugin("libtpu", False, given), "cpu,tpu")

  def test_no_tpu_chip_on_this_host_unless_jax_sees_one(self):
    try:
      from jax._src import hardware_utils   # what JAX itself counts (private)
    except ImportError:
      self.skipTest("jax._src.hardware_utils moved")
    self.assertEqual(host_memory.tpu_attached(),
                     hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0)

  def test_bad_setting_names_the_variable(self):
    env = dict(os.environ, **{host_memory.ENV_VAR: "yes"})
    result = subprocess.run([sys.executable, "-c", "from msca_jax import host_memory; "
                             "host_memory.keep_freed_memory()"], env=env, capture_output=True,
                            text=True)
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("MSCA_JAX_HOST_MALLOC='yes'", result.stderr)


if __name__ == "__main__":
  absltest.main()
