"""The fused decode step (``decode_step.c``): built once with the system C compiler, loaded with ctypes.

A decoded token's import among reused candidates is about fifteen PyTorch operations on tiny
tensors per layer; on a CPU each costs tens of microseconds, which made decoding from a large
memory 1.4-1.5x slower than decoding without one. The C function does the same work in one call.

It is built on first use into ``$KVMAP_CACHE/kernels`` (about a second), named by a hash of its
source, the compiler flags and the CPU's flags (``-march=native`` code must not run on another
CPU). Without a C compiler, or with ``KVMAP_NO_KERNEL=1``, :func:`decode_kernel` returns None and
the PyTorch path runs instead (same results; a test compares them).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_step.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c99"]
_loaded: dict[str, object] = {}


def decode_kernel():
    """The loaded ``kvmap_decode_step`` C function, or None where it cannot be built (logged once)."""
    if "fn" not in _loaded:
        _loaded["fn"] = None
        if os.environ.get("KVMAP_NO_KERNEL") != "1":
            try:
                _loaded["fn"] = _load(_build())
            except (OSError, subprocess.CalledProcessError) as err:  # FileNotFoundError is an OSError
                why = (getattr(err, "stderr", None) or str(err)).strip().splitlines()[0]  # the compiler's first complaint
                log.warning("kvmap: decode kernel unavailable (%s); using the PyTorch path", why)
    return _loaded["fn"]


def _build() -> Path:
    from kvmap.models.loading import cache_dir

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc/gcc) on PATH")
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"decode_step-{tag}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then rename: no half files
            built = Path(tmp) / target.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True,
                           capture_output=True, text=True)
            built.replace(target)
    return target


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), else the machine name: part of the built file's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _load(path: Path):
    fn = ctypes.CDLL(str(path)).kvmap_decode_step
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int] \
        + [ctypes.c_void_p] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 2
    return fn


PANEL = 8
"""Candidates per key panel (``PANEL`` in decode_step.c)."""


def key_panels(keys: torch.Tensor) -> torch.Tensor:
    """(H, C, d) float32 keys -> (H, ceil(C / PANEL), d, PANEL) panels, zero-padded: the kernel's scoring
    layout. Float16 where that is exact (keys stored as float16, the default), halving the bytes each
    decoded token streams; float32 otherwise."""
    h, c, d = keys.shape
    padded = torch.nn.functional.pad(keys, (0, 0, 0, -c % PANEL))  # (H, C', d)
    panels = padded.view(h, -1, PANEL, d).transpose(2, 3).contiguous()
    half = panels.half()
    return half if torch.equal(half.float(), panels) else panels


def decode_step(fn, slots: torch.Tensor, keys: torch.Tensor, panels: torch.Tensor, values: torch.Tensor,
                cand: torch.Tensor,
                q_local: torch.Tensor, k_local: torch.Tensor, v_local: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel. Shapes as in ``decode_step.c`` (``panels`` from :func:`key_panels`); every other
    tensor float32 (``cand`` int64), contiguous.

    Returns the attention output (Hkv, r, d) and the memory ids each query head took (Hkv, r, k).
    """
    n_kv, r, k, d = slots.shape
    n_cand, s = keys.shape[1], k_local.shape[1]
    out = torch.empty(n_kv, r, d)
    ids = torch.empty(n_kv, r, k, dtype=torch.int64)
    half = int(panels.dtype == torch.float16)
    if fn(n_kv, r, k, d, n_cand, s, slots.data_ptr(), keys.data_ptr(), panels.data_ptr(), half,
          *[t.data_ptr() for t in (values, cand, q_local, k_local, v_local)], scale, out.data_ptr(), ids.data_ptr()) != 0:
        raise MemoryError("kvmap decode kernel: out of memory for its scratch arrays")
    return out, ids
