"""Keeps freed host memory inside the process, so XLA:CPU's step buffers stop page-faulting.

XLA:CPU allocates a step's temporaries as one large block with the C library's malloc and frees
it when the step ends. glibc serves a block that large with mmap and returns it with munmap, so
every step touches fresh pages and pays a page fault for each (docs/performance.md has the numbers).

`keep_freed_memory` sets three glibc malloc options, the runtime equivalent of
GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...:
  * one arena: a thread's own arena can only grow in 64 MiB heaps and falls back to mmap for
    larger blocks whatever the other options say, so every thread uses the main heap;
  * no mmap: large blocks come from that heap too;
  * no trimming: freed memory stays mapped and the next step reuses it without faults.
Resident memory then stays at the run's peak instead of dropping between steps.

Entry points call it first, before JAX or TensorFlow start threads (arenas are picked when a
thread first allocates). It applies only where JAX will run on the CPU: on a GPU or TPU host the
step's buffers live on the device, and a host that never returns memory is a cost there with no
measured gain. So it does nothing when JAX_PLATFORMS names an accelerator first, or when an
accelerator plugin is installed and JAX_PLATFORMS does not ask for the CPU; nor on a non-glibc
system, nor with MSCA_JAX_HOST_MALLOC=default.

libtpu alone is no TPU: it is also the TPU compiler that tools/compile_tpu.py runs on any host
(docs/tpu_compile.md). Where no TPU chip is attached, `cpu_unless_tpu_attached` (called when the
package is imported) tells JAX to run on the CPU, as it would without libtpu: otherwise JAX starts
libtpu first, which prints its warnings and takes its lock file before JAX falls back to the CPU.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import importlib.util
import os
import sys

ENV_VAR = "MSCA_JAX_HOST_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8   # glibc's <malloc.h>
_NEVER_TRIM = -1   # mallopt takes an int; glibc stores it as size_t, so -1 means the maximum

_state: str | None = None

# Modules that give JAX a GPU or TPU backend (jax[cuda12], jax[tpu], ROCm).
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")
# TPU chips on the PCI bus (Google's vendor id, the chips' device ids), as JAX itself finds them
# (jax/_src/hardware_utils.py); Google's virtual NIC shares the vendor id, not the device ids.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def tpu_attached() -> bool:
  """Whether a TPU chip is on this host's PCI bus (read from /sys, without starting JAX)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "device")) as g:
        if f.read().strip() == _GOOGLE_PCI_VENDOR and g.read().strip() in _TPU_PCI_DEVICES:
          return True
    except OSError:
      continue
  return False


def accelerator_backend() -> str:
  """The accelerator JAX will use, found without starting JAX ('' when it will run on the CPU)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    first = platforms.split(",")[0].strip()
    return "" if first == "cpu" else f"JAX_PLATFORMS={platforms}"
  for module in _ACCELERATOR_MODULES:
    if importlib.util.find_spec(module) is not None and (module != "libtpu" or tpu_attached()):
      return module
  plugins = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
  return plugins[0] if plugins else ""


def cpu_unless_tpu_attached() -> None:
  """JAX_PLATFORMS=cpu where libtpu is installed, no TPU chip is attached and no other
  accelerator is installed; nothing where JAX_PLATFORMS is set."""
  if (os.environ.get("JAX_PLATFORMS", "").strip() or importlib.util.find_spec("libtpu") is None
      or accelerator_backend()):
    return
  jax = sys.modules.get("jax")
  if jax is not None and jax.config.jax_platforms is not None:
    return   # chosen in code
  os.environ["JAX_PLATFORMS"] = "cpu"
  if jax is not None:  # imported first: it read the variable already, and its backends wait
    jax.config.update("jax_platforms", "cpu")


def keep_freed_memory() -> str:
  """Applies the malloc options once; returns what was done, a line for the start-up log."""
  global _state
  if _state is not None:
    return _state
  setting = os.environ.get(ENV_VAR, "keep")
  if setting not in ("keep", "default"):
    raise ValueError(f"{ENV_VAR}={setting!r}: expected 'keep' or 'default'")
  accelerator = accelerator_backend() if setting == "keep" else ""
  if setting == "default":
    _state = f"host malloc: the C library's defaults ({ENV_VAR}=default)"
  elif accelerator:
    _state = f"host malloc: the C library's defaults (JAX will run on an accelerator: {accelerator})"
  elif not sys.platform.startswith("linux"):
    _state = "host malloc: the C library's defaults (not Linux)"
  else:
    try:
      libc = ctypes.CDLL("libc.so.6")
      libc.gnu_get_libc_version  # only glibc has it, and only glibc has these options
    except (OSError, AttributeError):
      _state = "host malloc: the C library's defaults (not glibc)"
    else:
      options = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
      failed = [option for option, value in options if libc.mallopt(option, value) != 1]
      _state = ("host malloc: freed memory is kept for reuse (one arena, no mmap, no trim; "
                f"{ENV_VAR}=default turns this off)" if not failed else
                f"host malloc: glibc refused mallopt options {failed}")
  return _state
