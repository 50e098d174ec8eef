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

  def test_an_installed_accelerator_plugin_means_an_accelerator(self):
    env = dict(os.environ, JAX_PLATFORMS="")
    env.pop("JAX_PLATFORMS")
    probe = ("import importlib.util, sys; from msca_jax import host_memory; "
             "real = importlib.util.find_spec; "
             "importlib.util.find_spec = lambda name, *a: object() if name == 'libtpu' else real(name, *a); "
             "print(host_memory.accelerator_backend())")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                            check=True)
    self.assertEqual(result.stdout.strip(), "libtpu")
    cpu = subprocess.run([sys.executable, "-c", probe.replace("libtpu'", "nothing'")], env=env,
                         capture_output=True, text=True, check=True)
    self.assertEqual(cpu.stdout.strip(), "")   # a host without an accelerator plugin, the CPU

  def test_bad_setting_names_the_variable(self):
    env = dict(os.environ, **{host_memory.ENV_VAR: "yes"})
    result = subprocess.run([sys.executable, "-c", "from msca_jax import host_memory; "
                             "host_memory.keep_freed_memory()"], env=env, capture_output=True,
                            text=True)
    self.assertNotEqual(result.returncode, 0)
    self.assertIn("MSCA_JAX_HOST_MALLOC='yes'", result.stderr)


if __name__ == "__main__":
  absltest.main()
