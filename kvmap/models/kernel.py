"""The fused decode step (``decode_step.c``): built once with the system C compiler, loaded with ctypes.

A decoded token's import among reused candidates is about fifteen PyTorch operations on tiny
tensors per layer; on a CPU each costs tens of microseconds, which made decoding from a large
memory 1.4-1.5x slower than decoding without one. The C function does the same work in one call.

It is built on first use into ``$KVMAP_CACHE/kernels`` (about a second), named by a hash of its
source, the compiler flags and the CPU's flags (``-march=native`` code must not run on another
CPU), followed by the sha256 of the built file itself. Before a cached file is loaded it must be a
regular file (not a symlink) in a folder that is not a symlink, both owned by this user and
writable by no one else, and its content must hash to the sha256 in its name (a truncated or
damaged file would crash the process inside ``dlopen``); a file that fails is removed and rebuilt.
A new build is first loaded in a child process, so a compiler's broken output cannot crash this
one. The hash guards integrity, not authenticity: the owner and mode checks keep others out.
Without a C compiler, with ``KVMAP_NO_KERNEL=1``, or where the cache folder cannot be written (or
its file cannot be used), :func:`decode_kernel` logs one warning and returns None, and the
PyTorch path runs instead (same results; tests compare them).

Ties: candidates with equal scores are taken in candidate order (the earliest index first, a
stable sort by (-score, index)), where ``torch.topk`` makes no promise; candidates with id < 0
(padding) are never taken, and slots left unfilled come last in reading order with id -1.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from kvmap.errors import InputError, KVMapError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_step.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c99"]
SYMBOL = "kvmap_decode_step"
BUILD_TIMEOUT_S = 120
"""A compiler (``$CC``) that runs longer than this is given up on: the PyTorch path runs."""
BAD_ARGUMENTS, OUT_OF_MEMORY = -2, -1
"""The kernel's error returns (``decode_step.c``)."""
_loaded: dict[str, object] = {}


class KernelUnavailable(Exception):
    """The kernel cannot be built or loaded here (the message says why); the PyTorch path runs."""


def decode_kernel():
    """The loaded ``kvmap_decode_step`` C function, or None where it cannot be built (logged once)."""
    if "fn" not in _loaded:
        _loaded["fn"] = None
        if os.environ.get("KVMAP_NO_KERNEL") != "1":
            try:
                _loaded["fn"] = _build_and_load()
            except (KernelUnavailable, OSError, KVMapError, subprocess.SubprocessError, ValueError) as err:
                log.warning("kvmap: decode kernel unavailable (%s); using the PyTorch path", _first_line(err))
    return _loaded["fn"]


def _first_line(err: BaseException) -> str:
    text = getattr(err, "stderr", None) or str(err) or type(err).__name__  # the compiler's first complaint
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _build_and_load():
    from kvmap.models.loading import cache_dir

    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    try:
        folder = Path(cache_dir()) / "kernels"
    except (OSError, KVMapError) as err:
        raise KernelUnavailable(f"no cache folder: {_first_line(err)}") from err
    if os.path.lexists(folder):
        _check_folder(folder)
        for path in sorted(folder.glob(f"decode_step-{tag}-*.so")):  # normally one
            try:
                return _load_verified(path)
            except KernelUnavailable as err:
                log.info("kvmap: rebuilding the decode kernel: %s", err)
                try:
                    path.unlink()  # ours (checked): a damaged or foreign file, replaced below
                except OSError:
                    pass
    return _load_verified(_build(folder, tag))


def _check_folder(folder: Path) -> None:
    """The kernels folder must be a real folder of this user's that no one else can write to."""
    try:
        st = os.lstat(folder)
    except OSError as err:
        raise KernelUnavailable(f"cannot use {folder}: {err.strerror}") from err
    if not stat.S_ISDIR(st.st_mode):
        raise KernelUnavailable(f"{folder} is not a folder (a symlink or a file)")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise KernelUnavailable(f"{folder} belongs to another user")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        try:
            os.chmod(folder, stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
        except OSError as err:
            raise KernelUnavailable(f"{folder} is writable by others and cannot be made private") from err


_NAME = re.compile(r"decode_step-[0-9a-f]{16}-(?P<sha>[0-9a-f]{64})\.so")


def _load_verified(path: Path):
    """Load ``path`` after checking it (see the module docstring); KernelUnavailable when it fails."""
    match = _NAME.fullmatch(path.name)
    if match is None:
        raise KernelUnavailable(f"{path.name} is not a kernel file name")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:  # ELOOP: a symlink
        raise KernelUnavailable(f"cannot open {path.name}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KernelUnavailable(f"{path.name} is not a regular file")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise KernelUnavailable(f"{path.name} belongs to another user")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise KernelUnavailable(f"{path.name} is writable by others")
        digest = hashlib.sha256()
        with os.fdopen(os.dup(fd), "rb") as f:
            for block in iter(lambda: f.read(1 << 16), b""):
                digest.update(block)
        if digest.hexdigest() != match["sha"]:
            raise KernelUnavailable(f"{path.name} is damaged (its sha256 does not match)")
    finally:
        os.close(fd)
    # By its path (not /proc/self/fd/N: dlopen takes a name it has seen for that library): the folder
    # is private, so only this user can swap the file between the check and here.
    try:
        library = ctypes.CDLL(str(path))
    except OSError as err:
        raise KernelUnavailable(f"{path.name} cannot be loaded: {_first_line(err)}") from err
    try:
        fn = getattr(library, SYMBOL)
    except AttributeError as err:
        raise KernelUnavailable(f"{path.name} has no {SYMBOL}") from err
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int] \
        + [ctypes.c_void_p] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 2
    return fn


def _build(folder: Path, tag: str) -> Path:
    """Compile into ``folder`` (aside, then renamed: no half files) as ``decode_step-<tag>-<sha256>.so``."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelUnavailable("no C compiler (cc/gcc) on PATH")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:  # a read-only cache, or $KVMAP_CACHE a regular file
        raise KernelUnavailable(f"cannot create {folder}: {err.strerror or err}") from err
    _check_folder(folder)
    try:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / "decode_step.so"
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True,
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=BUILD_TIMEOUT_S)
            if not built.is_file():
                raise KernelUnavailable(f"the compiler {compiler!r} wrote no file")
            os.chmod(built, 0o755)
            _try_in_child(built)
            sha = hashlib.sha256(built.read_bytes()).hexdigest()
            target = folder / f"decode_step-{tag}-{sha}.so"
            built.replace(target)
    except subprocess.TimeoutExpired as err:
        raise KernelUnavailable(f"the compiler {compiler!r} ran over {BUILD_TIMEOUT_S} s") from err
    except OSError as err:
        if isinstance(err, FileNotFoundError) and err.filename == compiler:
            raise KernelUnavailable(f"no C compiler at {compiler!r}") from err
        raise KernelUnavailable(f"cannot build in {folder}: {err.strerror or err}") from err
    return target


def _try_in_child(path: Path) -> None:
    """Load a new build in a child process first: a broken file kills the child, not this process."""
    if not sys.executable:  # an embedded interpreter: nothing to run the probe with
        log.info("kvmap: no Python executable to test the new decode kernel in; loading it directly")
        return
    probe = f"import ctypes; ctypes.CDLL({str(path)!r}).{SYMBOL}"
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelUnavailable(f"cannot test the built kernel: {_first_line(err)}") from err
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit status {done.returncode}"  # the exception, or the signal
        raise KernelUnavailable(f"the built kernel does not load: {why}")


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), else the machine name: part of the built file's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


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
    """Run the kernel: one decoded token's attention over [the top-k candidates, the local K/V].

    Shapes (as in ``decode_step.c``): ``slots`` (Hkv, r, k, d), ``keys`` and ``values`` (Hkv, C, d),
    ``panels`` from :func:`key_panels` of ``keys`` (float16 or float32), ``cand`` (Hkv, C) int64,
    ``q_local`` (Hkv, r, d), ``k_local`` and ``v_local`` (Hkv, S, d); every other tensor float32, all
    contiguous and on the CPU, with k, d, Hkv, r >= 1. Anything else raises :class:`InputError`
    naming the tensor (before the C code sees a pointer). That ``panels`` holds the same keys as
    ``keys`` is not checked (it would cost a pass over them at every token).

    Each query head takes the k candidates with the highest score ``slots[..., k-1, :] · key``, ties
    to the earliest candidate (see the module docstring), never one with ``cand < 0``; they are read
    in candidate order, slot j scored with ``slots[..., j, :]``. Unfilled slots (k > the real
    candidates) come last and have id -1. A query with nothing to attend to (no candidate taken and
    S = 0) gets a zero output.

    Returns the attention output (Hkv, r, d) and the memory ids each query head took (Hkv, r, k).
    """
    _check(slots, keys, panels, values, cand, q_local, k_local, v_local)
    n_kv, r, k, d = slots.shape
    n_cand, s = keys.shape[1], k_local.shape[1]
    out = torch.empty(n_kv, r, d)
    ids = torch.empty(n_kv, r, k, dtype=torch.int64)
    half = int(panels.dtype == torch.float16)
    status = fn(n_kv, r, k, d, n_cand, s, slots.data_ptr(), keys.data_ptr(), panels.data_ptr(), half,
                values.data_ptr(), cand.data_ptr(), q_local.data_ptr(), k_local.data_ptr(), v_local.data_ptr(),
                scale, out.data_ptr(), ids.data_ptr())
    if status != 0:
        if status == OUT_OF_MEMORY:
            raise MemoryError("kvmap decode kernel: out of memory for its scratch arrays")
        raise InputError(f"kvmap decode kernel: bad arguments (status {status}): "
                         f"Hkv={n_kv} r={r} k={k} d={d} candidates={n_cand} local={s}; "
                         "k, d, Hkv and r must be at least 1")
    return out, ids


_F32, _F16, _I64 = torch.float32, torch.float16, torch.int64


def _check(slots, keys, panels, values, cand, q_local, k_local, v_local) -> None:
    """The cheap checks of :func:`decode_step` (a few microseconds); :func:`_explain` says what is wrong."""
    try:
        n_kv, r, k, d = slots.shape
        n_cand, s = keys.shape[1], k_local.shape[1]
        ok = (slots.dtype is _F32 and keys.dtype is _F32 and values.dtype is _F32 and cand.dtype is _I64
              and q_local.dtype is _F32 and k_local.dtype is _F32 and v_local.dtype is _F32
              and (panels.dtype is _F16 or panels.dtype is _F32)
              and keys.shape == values.shape == (n_kv, n_cand, d) and cand.shape == (n_kv, n_cand)
              and panels.shape == (n_kv, -(-n_cand // PANEL), d, PANEL) and q_local.shape == (n_kv, r, d)
              and k_local.shape == v_local.shape == (n_kv, s, d)
              and slots.is_contiguous() and keys.is_contiguous() and panels.is_contiguous()
              and values.is_contiguous() and cand.is_contiguous() and q_local.is_contiguous()
              and k_local.is_contiguous() and v_local.is_contiguous()
              and slots.is_cpu and keys.is_cpu and panels.is_cpu and values.is_cpu and cand.is_cpu
              and q_local.is_cpu and k_local.is_cpu and v_local.is_cpu
              and n_kv >= 1 and r >= 1 and k >= 1 and d >= 1)
    except (AttributeError, TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        raise InputError(_explain(slots=slots, keys=keys, panels=panels, values=values, cand=cand,
                                  q_local=q_local, k_local=k_local, v_local=v_local))


def _explain(**tensors) -> str:
    """A one-line message naming the first tensor that :func:`decode_step` cannot take (error path only:
    each size is the one most of the tensors agree on, so the odd one out is named)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return f"kvmap decode kernel: {name} is a {type(t).__name__}, not a torch.Tensor"
    layouts = {"slots": "Hkv r k d", "keys": "Hkv C d", "panels": "Hkv P d 8", "values": "Hkv C d",
               "cand": "Hkv C", "q_local": "Hkv r d", "k_local": "Hkv S d", "v_local": "Hkv S d"}
    for name, layout in layouts.items():
        if tensors[name].dim() != len(layout.split()):
            return (f"kvmap decode kernel: {name} must be ({', '.join(layout.split())}), "
                    f"got shape {tuple(tensors[name].shape)}")
    votes: dict[str, list[int]] = {}
    for name, layout in layouts.items():
        for axis, size in zip(layout.split(), tensors[name].shape):
            votes.setdefault(axis, []).append(int(size))
    size = {axis: max(sizes, key=sizes.count) for axis, sizes in votes.items()}  # ties: the first tensor's
    size["P"], size["8"] = -(-size["C"] // PANEL), PANEL
    if min(size["Hkv"], size["r"], size["k"], size["d"]) < 1:
        return (f"kvmap decode kernel: slots {tuple(tensors['slots'].shape)}: Hkv, r, k (top_k) and d "
                "must be at least 1")
    dtypes = {"panels": (torch.float16, torch.float32), "cand": (torch.int64,)}
    for name, t in tensors.items():
        allowed = dtypes.get(name, (torch.float32,))
        if t.dtype not in allowed:
            want = " or ".join(str(x).removeprefix("torch.") for x in allowed)
            return f"kvmap decode kernel: {name} must be {want}, got {str(t.dtype).removeprefix('torch.')}"
        if t.device.type != "cpu":
            return f"kvmap decode kernel: {name} must be on the CPU, got {t.device}"
        axes = layouts[name].split()
        want = tuple(size[a] for a in axes)
        if tuple(t.shape) != want:
            return (f"kvmap decode kernel: {name} must be ({', '.join(axes)}) = {want} to match the other "
                    f"tensors, got {tuple(t.shape)}")
        if not t.is_contiguous():
            return f"kvmap decode kernel: {name} must be contiguous (call .contiguous())"
    return "kvmap decode kernel: bad arguments"
