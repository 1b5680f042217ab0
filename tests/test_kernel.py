"""The fused C decode step (kvmap/models/decode_step.c, loaded by kvmap.models.kernel).

The kernel against a pure-PyTorch reference of the same step (float16 and float32 key panels,
padding, k = C, k > C, GQA, ties), its argument checks (C and Python), and the cached ``.so``:
damaged, foreign or symlinked files are rebuilt or refused, never loaded; an unusable cache folder
or compiler leaves the PyTorch path (None), with one warning.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvmap.errors import InputError, KVMapError
from kvmap.models import kernel

REPO = Path(__file__).resolve().parents[1]
HAVE_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the decode kernel cannot be built")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the kernel function, the cache folder it was built in): one build for the whole module."""
    if not HAVE_CC:
        pytest.skip("no C compiler: the decode kernel cannot be built")
    cache = tmp_path_factory.mktemp("kvmap-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVMAP_CACHE", str(cache))
        mp.delenv("KVMAP_NO_KERNEL", raising=False)
        mp.setattr(kernel, "_loaded", {})
        fn = kernel.decode_kernel()
    if fn is None:
        pytest.skip("the decode kernel did not build here")
    return fn, cache


@pytest.fixture
def fn(built):
    return built[0]


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A fresh kernel cache: KVMAP_CACHE at an empty folder, nothing loaded yet. Returns the folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KVMAP_CACHE", str(cache))
    monkeypatch.delenv("KVMAP_NO_KERNEL", raising=False)
    monkeypatch.setattr(kernel, "_loaded", {})
    return cache


def _cached_files(cache: Path) -> list[Path]:
    return sorted((cache / "kernels").glob("decode_step-*.so"))


def _copy_cache(built, tmp_path) -> tuple[Path, Path]:
    """A copy of the built cache; returns (cache folder, its one kernel file)."""
    cache = tmp_path / "cache"
    shutil.copytree(built[1], cache)
    files = _cached_files(cache)
    assert len(files) == 1, files
    return cache, files[0]


# ---------------------------------------------------------------------------------------------
# The reference: the step of decode_step.c in float64 PyTorch, ties broken by candidate index.

def reference(slots, keys, values, cand, q_local, k_local, v_local, scale):
    n_kv, r, k, d = slots.shape
    n_cand = keys.shape[1]
    out = torch.zeros(n_kv, r, d, dtype=torch.float64)
    ids = torch.full((n_kv, r, k), -1, dtype=torch.int64)
    for h in range(n_kv):
        for i in range(r):
            scores = keys[h].double() @ slots[h, i, k - 1].double()  # the search query: the last slot
            real = [c for c in range(n_cand) if cand[h, c] >= 0 and scores[c] > float("-inf")]
            taken = sorted(sorted(real, key=lambda c: (-scores[c].item(), c))[:k])  # top-k, then reading order
            logits, vals = [], []
            for j, c in enumerate(taken):  # memory slot j: the query rotated to slot j
                ids[h, i, j] = cand[h, c]
                logits.append(slots[h, i, j].double() @ keys[h, c].double())
                vals.append(values[h, c].double())
            local = (k_local[h].double() @ q_local[h, i].double()) * scale
            all_logits = torch.cat([torch.stack(logits) if logits else torch.zeros(0, dtype=torch.float64), local])
            if all_logits.numel() == 0:
                continue  # nothing to attend to: zero output
            probs = torch.softmax(all_logits, dim=0)
            all_values = torch.cat([torch.stack(vals) if vals else torch.zeros(0, d, dtype=torch.float64),
                                    v_local[h].double()])
            out[h, i] = probs @ all_values
    return out.float(), ids


def make_case(n_kv=2, r=1, k=4, d=16, n_cand=21, s=5, pad=0, half_keys=False, seed=0, dyadic=False):
    """Random inputs of one decode step; the last ``pad`` candidates of each head are padding (-1),
    as a memory's fetch returns them. ``half_keys``: keys exact in float16 (float16 panels)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        if dyadic:  # multiples of 1/8 in [-2, 2]: every dot product exact, so ties are exact ties
            return torch.randint(-16, 17, shape, generator=g).float() / 8
        return torch.randn(*shape, generator=g)

    keys = rand(n_kv, n_cand, d)
    if half_keys:
        keys = keys.half().float()
    cand = torch.stack([torch.randperm(10 * n_cand + 1, generator=g)[:n_cand].sort().values for _ in range(n_kv)])
    if pad:
        cand[:, n_cand - pad:] = -1
    return dict(slots=rand(n_kv, r, k, d), keys=keys, panels=kernel.key_panels(keys), values=rand(n_kv, n_cand, d),
                cand=cand, q_local=rand(n_kv, r, d), k_local=rand(n_kv, s, d), v_local=rand(n_kv, s, d),
                scale=0.25)


def _run_both(fn, case):
    out, ids = kernel.decode_step(fn, **case)
    ref_out, ref_ids = reference(**{name: t for name, t in case.items() if name != "panels"})
    return out, ids, ref_out, ref_ids


CASES = {
    "plain": dict(),
    "padding": dict(pad=6),
    "k=C": dict(n_cand=9, k=9),
    "k=C padded": dict(n_cand=9, k=9, pad=3),
    "k>C": dict(n_cand=5, k=12),
    "k>C padded": dict(n_cand=7, k=12, pad=4),
    "all padding": dict(n_cand=6, k=3, pad=6),
    "GQA r=3": dict(r=3, n_kv=3, k=5, n_cand=40, pad=5),
    "GQA r=5 (a partial group of 4)": dict(r=5, k=3, n_cand=17),
    "odd d=17": dict(d=17, r=2, n_cand=13, pad=1),
    "d=64, 300 candidates": dict(d=64, r=3, n_kv=3, k=16, n_cand=300, s=40, pad=11),
    "one candidate": dict(n_cand=1, k=1),
}


@needs_cc
@pytest.mark.parametrize("half_keys", [True, False], ids=["float16 panels", "float32 panels"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_the_reference(fn, name, half_keys):
    case = make_case(half_keys=half_keys, seed=len(name), **CASES[name])
    assert case["panels"].dtype == (torch.float16 if half_keys else torch.float32)
    out, ids, ref_out, ref_ids = _run_both(fn, case)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


@needs_cc
def test_kernel_keeps_unfilled_slots_last_with_id_minus_one(fn):
    case = make_case(n_cand=7, k=10, pad=3, r=2)
    _, ids = kernel.decode_step(fn, **case)
    assert (ids[..., :4] == case["cand"][:, None, :4]).all()  # all 4 real candidates, in candidate order
    assert (ids[..., 4:] == -1).all()


@needs_cc
def test_kernel_with_no_candidates_is_local_attention(fn):
    case = make_case(n_cand=0, k=2, r=2)
    assert case["panels"].shape == (2, 0, 16, kernel.PANEL)
    out, ids, ref_out, ref_ids = _run_both(fn, case)
    assert (ids == -1).all()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("half_keys", [True, False], ids=["float16 panels", "float32 panels"])
def test_ties_go_to_the_earliest_candidate(fn, half_keys):
    """Equal scores: the kernel takes the earlier candidate (a stable sort by (-score, index))."""
    case = make_case(n_kv=2, r=3, k=4, d=8, n_cand=24, s=3, pad=2, half_keys=half_keys, dyadic=True, seed=3)
    keys = case["keys"]
    keys[:, 12:22] = keys[:, 2:12]  # candidates 12..21 tie with 2..11 (same keys, so the same scores)
    keys[1, :] = keys[1, 5]  # head 1: every candidate ties
    case["panels"] = kernel.key_panels(keys)
    out, ids, ref_out, ref_ids = _run_both(fn, case)
    assert torch.equal(ids, ref_ids)
    assert (ids[1] == case["cand"][1, :4]).all()  # all tied: the first four
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad arguments: refused with a clear error, never a crash.

def _raw(fn, case, **sizes):
    """Call the C function directly with ``case``'s arrays and sizes overridden by ``sizes``."""
    n_kv, r, k, d = case["slots"].shape
    dims = dict(n_kv=n_kv, r=r, k=k, d=d, n_cand=case["keys"].shape[1], s=case["k_local"].shape[1], half=0)
    dims.update(sizes)
    out = torch.zeros(n_kv, r, d)
    ids = torch.zeros(n_kv, r, max(k, 1), dtype=torch.int64)
    ptr = {name: case[name].data_ptr() for name in ("slots", "keys", "values", "cand", "q_local", "k_local",
                                                    "v_local")}
    panels = case["panels"].float() if not dims["half"] else case["panels"]
    return fn(dims["n_kv"], dims["r"], dims["k"], dims["d"], dims["n_cand"], dims["s"], ptr["slots"], ptr["keys"],
              panels.data_ptr(), dims["half"], ptr["values"], ptr["cand"], ptr["q_local"], ptr["k_local"],
              ptr["v_local"], 0.25, out.data_ptr(), ids.data_ptr())


@needs_cc
@pytest.mark.parametrize("sizes", [dict(k=0), dict(k=-1), dict(d=0), dict(n_kv=0), dict(r=0), dict(n_cand=-1),
                                   dict(s=-1), dict(half=2)], ids=lambda s: " ".join(f"{a}={b}" for a, b in s.items()))
def test_c_kernel_refuses_bad_sizes(fn, sizes):
    """top_k = 0 used to write best[-1] and pick[-1] (heap corruption); now -2 before any access."""
    case = make_case()
    assert _raw(fn, case) == 0
    assert _raw(fn, case, **sizes) == kernel.BAD_ARGUMENTS == -2


@needs_cc
def test_c_kernel_refuses_null_arrays(fn):
    case = make_case()
    n_kv, r, k, d = case["slots"].shape
    out, ids = torch.zeros(n_kv, r, d), torch.zeros(n_kv, r, k, dtype=torch.int64)
    assert fn(n_kv, r, k, d, case["keys"].shape[1], case["k_local"].shape[1], case["slots"].data_ptr(), None,
              case["panels"].float().data_ptr(), 0, case["values"].data_ptr(), case["cand"].data_ptr(),
              case["q_local"].data_ptr(), case["k_local"].data_ptr(), case["v_local"].data_ptr(), 0.25,
              out.data_ptr(), ids.data_ptr()) == -2


@needs_cc
def test_top_k_zero_raises_a_kvmap_error(fn):
    case = make_case(k=1)
    case["slots"] = case["slots"][:, :, :0].contiguous()  # k = 0
    with pytest.raises(InputError, match=r"top_k"):
        kernel.decode_step(fn, **case)


@needs_cc
def test_status_codes_become_kvmap_errors(built):
    case = make_case()
    with pytest.raises(InputError, match="bad arguments"):
        kernel.decode_step(lambda *a: -2, **case)
    with pytest.raises(MemoryError):
        kernel.decode_step(lambda *a: -1, **case)
    assert issubclass(InputError, KVMapError)


def _bad_inputs():
    """(what is wrong, the tensor the message must name, change to a good case)."""
    def set_(name, make):
        def change(case):
            case[name] = make(case)
        return change
    return [
        ("keys float64", "keys", set_("keys", lambda c: c["keys"].double())),
        ("values float16", "values", set_("values", lambda c: c["values"].half())),
        ("cand int32", "cand", set_("cand", lambda c: c["cand"].int())),
        ("panels bfloat16", "panels", set_("panels", lambda c: c["panels"].bfloat16())),
        ("slots float64", "slots", set_("slots", lambda c: c["slots"].double())),
        ("q_local not contiguous", "q_local", set_("q_local", lambda c: c["q_local"].transpose(0, 1).contiguous()
                                                    .transpose(0, 1))),
        ("k_local not contiguous", "k_local", set_("k_local", lambda c: c["k_local"][:, ::2])),
        ("keys one candidate more", "keys", set_("keys", lambda c: torch.cat([c["keys"], c["keys"][:, :1]], 1))),
        ("values d - 1", "values", set_("values", lambda c: c["values"][..., 1:].contiguous())),
        ("cand one candidate fewer", "cand", set_("cand", lambda c: c["cand"][:, 1:].contiguous())),
        ("panels of other keys", "panels", set_("panels", lambda c: kernel.key_panels(c["keys"][:, :5].contiguous()))),
        ("panels flat", "panels", set_("panels", lambda c: c["panels"].flatten())),
        ("q_local r + 1", "q_local", set_("q_local", lambda c: torch.cat([c["q_local"], c["q_local"]], 1))),
        ("v_local one more than k_local", "v_local",
         set_("v_local", lambda c: torch.cat([c["v_local"], c["v_local"][:, :1]], 1))),
        ("k_local other heads", "k_local", set_("k_local", lambda c: c["k_local"][:1].contiguous())),
        ("slots 3-D", "slots", set_("slots", lambda c: c["slots"][:, 0].contiguous())),
        ("keys a numpy array", "keys", set_("keys", lambda c: c["keys"].numpy())),
        ("keys on the meta device", "keys", set_("keys", lambda c: c["keys"].to("meta"))),
    ]


@needs_cc
@pytest.mark.parametrize("what,name,change", _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_mismatched_tensors_raise_a_one_line_error(fn, what, name, change):
    case = make_case(n_kv=2, r=2, k=3, d=16, n_cand=21, s=4)
    change(case)
    with pytest.raises(InputError) as err:
        kernel.decode_step(fn, **case)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"kvmap decode kernel: {name} "), message


def test_checks_are_cheap():
    """The always-on checks run at every decoded token in every layer: a few microseconds."""
    import timeit

    case = make_case(n_kv=3, r=3, k=16, d=64, n_cand=64, s=32)
    args = [case[name] for name in ("slots", "keys", "panels", "values", "cand", "q_local", "k_local", "v_local")]
    kernel._check(*args)
    per_call = min(timeit.repeat(lambda: kernel._check(*args), number=2000, repeat=5)) / 2000
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} us per call"  # ~2.5 us measured; loose for loaded CI


# ---------------------------------------------------------------------------------------------
# The cached .so.

def _child(cache: Path, code: str, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python with KVMAP_CACHE=cache: a SIGBUS there fails the test, not pytest."""
    full_env = {**os.environ, "KVMAP_CACHE": str(cache), **env}
    full_env.pop("KVMAP_NO_KERNEL", None)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=300)


LOAD_AND_RUN = """
import logging, torch
logging.basicConfig(level=logging.WARNING)
from kvmap.models import kernel
fn = kernel.decode_kernel()
if fn is not None:
    keys = torch.randn(1, 3, 8).half().float()
    out, ids = kernel.decode_step(fn, torch.randn(1, 1, 2, 8), keys, kernel.key_panels(keys), torch.randn(1, 3, 8),
                                  torch.tensor([[0, 1, -1]]), torch.randn(1, 1, 8), torch.randn(1, 2, 8),
                                  torch.randn(1, 2, 8), 0.3)
    assert sorted(ids.flatten().tolist()) == [0, 1]
print("kernel" if fn is not None else "pytorch")
"""


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("WARNING")]


@needs_cc
def test_truncated_cached_kernel_is_rebuilt_not_loaded(built, tmp_path):
    """The first 8000 bytes of the real .so used to kill the process with SIGBUS inside dlopen."""
    cache, so = _copy_cache(built, tmp_path)
    so.write_bytes(so.read_bytes()[:8000])
    done = _child(cache, LOAD_AND_RUN)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["kernel"] and not _warnings(done.stderr), done.stderr
    (rebuilt,) = _cached_files(cache)
    assert rebuilt.read_bytes() == (built[1] / "kernels" / so.name).read_bytes()


@needs_cc
def test_truncated_cached_kernel_without_a_compiler_falls_back(built, tmp_path):
    cache, so = _copy_cache(built, tmp_path)
    so.write_bytes(so.read_bytes()[:8000])
    done = _child(cache, LOAD_AND_RUN, CC=str(tmp_path / "no-such-compiler"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["pytorch"]
    assert len(_warnings(done.stderr)) == 1, done.stderr


@needs_cc
def test_compiler_output_that_crashes_on_load_falls_back(built, tmp_path):
    """A 'compiler' that writes a truncated .so: the new build is tried in a child process first."""
    cache = tmp_path / "cache"
    good = _cached_files(built[1])[0]
    fake_cc = tmp_path / "fakecc"
    fake_cc.write_text(f"#!/bin/sh\nwhile [ \"$1\" != -o ]; do shift; done\nhead -c 8000 '{good}' > \"$2\"\n")
    fake_cc.chmod(0o755)
    done = _child(cache, LOAD_AND_RUN, CC=str(fake_cc))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["pytorch"]
    assert len(_warnings(done.stderr)) == 1 and "does not load" in done.stderr, done.stderr
    assert _cached_files(cache) == []


def _library_without_the_symbol(tmp_path) -> bytes:
    src = tmp_path / "other.c"
    src.write_text("int not_the_kernel(void) { return 0; }\n")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(tmp_path / "other.so")], check=True)
    return (tmp_path / "other.so").read_bytes()


@needs_cc
def test_cached_kernel_without_the_symbol_is_replaced(built, tmp_path):
    """A .so without kvmap_decode_step in the real one's place: rebuilt, no traceback."""
    cache, so = _copy_cache(built, tmp_path)
    so.write_bytes(_library_without_the_symbol(tmp_path))
    done = _child(cache, LOAD_AND_RUN)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["kernel"], done.stderr


@needs_cc
def test_valid_library_without_the_symbol_falls_back_with_a_warning(built, tmp_path, monkeypatch, caplog):
    """Even a file whose hash matches its name but lacks the symbol: a warning, not an AttributeError."""
    cache, so = _copy_cache(built, tmp_path)
    other = _library_without_the_symbol(tmp_path)
    tag = so.name.split("-")[1].removesuffix(".so")
    so.unlink()
    (cache / "kernels" / f"decode_step-{tag}-{hashlib.sha256(other).hexdigest()}.so").write_bytes(other)
    monkeypatch.setenv("KVMAP_CACHE", str(cache))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))  # and no rebuild possible
    monkeypatch.setattr(kernel, "_loaded", {})
    with caplog.at_level(logging.WARNING, logger="kvmap.models.kernel"):
        assert kernel.decode_kernel() is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@needs_cc
def test_symlinked_cached_kernel_is_not_loaded(built, tmp_path, monkeypatch):
    cache, so = _copy_cache(built, tmp_path)
    elsewhere = tmp_path / "elsewhere.so"
    so.rename(elsewhere)
    so.symlink_to(elsewhere)
    monkeypatch.setenv("KVMAP_CACHE", str(cache))
    monkeypatch.setattr(kernel, "_loaded", {})
    assert kernel.decode_kernel() is not None
    (rebuilt,) = _cached_files(cache)
    assert not rebuilt.is_symlink() and elsewhere.exists()  # the link removed, not what it pointed at


@needs_cc
def test_writable_by_others_cached_kernel_is_rebuilt(built, tmp_path, monkeypatch):
    cache, so = _copy_cache(built, tmp_path)
    so.chmod(0o666)
    (cache / "kernels").chmod(0o777)
    monkeypatch.setenv("KVMAP_CACHE", str(cache))
    monkeypatch.setattr(kernel, "_loaded", {})
    assert kernel.decode_kernel() is not None
    (rebuilt,) = _cached_files(cache)
    assert not rebuilt.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    assert not (cache / "kernels").stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)


@needs_cc
def test_a_fresh_build_is_named_by_its_sha256_and_private(fresh):
    assert kernel.decode_kernel() is not None
    (so,) = _cached_files(fresh)
    assert so.name.endswith(f"-{hashlib.sha256(so.read_bytes()).hexdigest()}.so")
    assert list((fresh / "kernels").iterdir()) == [so]  # no temporary left
    assert not (fresh / "kernels").stat().st_mode & 0o077


def _one_warning(caplog) -> str:
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "\n" not in warnings[0]
    return warnings[0]


@needs_cc
def test_cache_that_is_a_regular_file_falls_back(fresh, monkeypatch, caplog, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("KVMAP_CACHE", str(tmp_path / "a-file"))
    with caplog.at_level(logging.WARNING, logger="kvmap.models.kernel"):
        assert kernel.decode_kernel() is None
        assert kernel.decode_kernel() is None  # decided once
    assert "PyTorch path" in _one_warning(caplog)


@needs_cc
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write a read-only folder")
def test_read_only_cache_falls_back(fresh, caplog):
    fresh.mkdir()
    fresh.chmod(0o500)
    try:
        with caplog.at_level(logging.WARNING, logger="kvmap.models.kernel"):
            assert kernel.decode_kernel() is None
        _one_warning(caplog)
    finally:
        fresh.chmod(0o700)


def _read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


@needs_cc
def test_read_only_file_system_falls_back(fresh, monkeypatch, caplog):
    """(Simulated, so that it runs as root too.) Nothing can be built: one warning, the PyTorch path."""
    monkeypatch.setattr(kernel.tempfile, "TemporaryDirectory", _read_only)
    with caplog.at_level(logging.WARNING, logger="kvmap.models.kernel"):
        assert kernel.decode_kernel() is None
    assert "Read-only file system" in _one_warning(caplog)


@needs_cc
def test_read_only_cache_still_loads_a_good_cached_kernel(built, tmp_path, monkeypatch):
    cache, _ = _copy_cache(built, tmp_path)
    monkeypatch.setenv("KVMAP_CACHE", str(cache))
    monkeypatch.setattr(kernel, "_loaded", {})
    monkeypatch.setattr(kernel.tempfile, "TemporaryDirectory", _read_only)
    assert kernel.decode_kernel() is not None


def test_cache_folder_errors_fall_back(fresh, monkeypatch, caplog):
    import kvmap.models.loading as loading

    def broken():
        raise KVMapError("KVMAP_CACHE is not usable")

    monkeypatch.setattr(loading, "cache_dir", broken)
    with caplog.at_level(logging.WARNING, logger="kvmap.models.kernel"):
        assert kernel.decode_kernel() is None
    assert "KVMAP_CACHE is not usable" in _one_warning(caplog)


@pytest.mark.parametrize("cc", ["/no/such/cc", "cc; rm -rf /tmp/x", "/bin/false", "/bin/true"])
def test_odd_compilers_fall_back(fresh, monkeypatch, caplog, cc):
    monkeypatch.setenv("CC", cc)
    with caplog.at_level(logging.WARNING, logger="kvmap.models.kernel"):
        assert kernel.decode_kernel() is None
    _one_warning(caplog)


def test_a_compiler_that_hangs_is_given_up_on(fresh, monkeypatch, caplog, tmp_path):
    slow = tmp_path / "slowcc"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(0o755)
    monkeypatch.setenv("CC", str(slow))
    monkeypatch.setattr(kernel, "BUILD_TIMEOUT_S", 1)
    with caplog.at_level(logging.WARNING, logger="kvmap.models.kernel"):
        assert kernel.decode_kernel() is None
    assert "ran over" in _one_warning(caplog)


def test_kvmap_no_kernel(fresh, monkeypatch):
    monkeypatch.setenv("KVMAP_NO_KERNEL", "1")
    assert kernel.decode_kernel() is None
    assert not fresh.exists()
