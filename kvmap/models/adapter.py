"""A memory adapter: LoRA weights (peft) that act only while a causal LM answers from memory.

Why only then: a memory holds the keys and values the *base* model wrote when it read a text. LoRA on
any layer changes the hidden states every later layer sees, so a model with the adapter always on
would write other keys than the memories already on disk, and no memory could be shared between the
base and the tuned model. Here the adapter is switched on by the port's ``importing`` block (and, for blocks
spliced into a prompt, around the reading of that prompt and the answer: :func:`adapter_active`) and off
everywhere else: reading (``remember``), answering without memory and every baseline (unless it says ``adapter=1``) run the base
model bit for bit, and every existing memory stays valid. What the adapter learns
(:mod:`kvmap.training.memory_tuning`) is how to *use* imported memories: how the queries score them
and what the layers do with what comes back.

The LoRA layers are injected in place with ``peft.inject_adapter_in_model`` (the model keeps its
class, so the ports see the same modules); the key and value projections are never targets.

A checkpoint is a folder with ``adapter.safetensors`` (the LoRA weights only) and ``adapter.json``
(the LoRA settings, the base model's identity, and how it was trained). Loading it into another base
model is refused.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from kvmap.errors import InputError, ModelLoadError

WEIGHTS, SETTINGS = "adapter.safetensors", "adapter.json"
FORBIDDEN_TARGETS = ("k_proj", "v_proj")
"""Never adapted: keys and values are what memories store (see the module docstring)."""


@dataclass(frozen=True)
class AdapterSettings:
    """The LoRA shape: rank, scaling and which linear layers of each decoder block get one."""

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise InputError(f"adapter rank must be a whole number, 1 or more, got {self.rank!r}")
        bad = [t for t in self.targets if t in FORBIDDEN_TARGETS]
        if bad:
            raise InputError(f"adapter targets {bad} would change the keys/values memories store; "
                             f"choose among q_proj, o_proj and the MLP projections")
        object.__setattr__(self, "targets", tuple(self.targets))


@dataclass
class AdapterInfo:
    """What ``adapter.json`` holds."""

    base_model_id: str
    settings: AdapterSettings
    training: dict = field(default_factory=dict)
    """How the weights were trained (steps, data, settings): written by ``kvmap finetune``."""


MARK = "_kvmap_lora_layers"
"""Attribute :func:`add_adapter` sets on the model: its LoRA layers, so that every ``port.importing`` of a model
without an adapter costs one ``getattr`` (no peft import, no walk over the modules)."""


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    return list(getattr(model, MARK, ()))


def has_adapter(model: nn.Module) -> bool:
    return bool(_lora_layers(model))


def _switch(layers: list[nn.Module], off: list[bool]) -> None:
    """Set each LoRA layer's off switch. peft's public ``enable_adapters`` also flips ``requires_grad`` of the
    weights, which a training step in progress must keep, so the flag it sets is set directly (a test checks
    that the switch still works with the installed peft)."""
    for layer, value in zip(layers, off):
        layer._disable_adapters = value


def add_adapter(model: nn.Module, settings: AdapterSettings | None = None, seed: int = 0) -> list[nn.Parameter]:
    """Inject fresh LoRA layers (B = 0: the adapted model starts equal to the base) and return their
    parameters, which are the only ones left trainable. The adapter starts switched off."""
    from peft import LoraConfig, inject_adapter_in_model

    if has_adapter(model):
        raise InputError("this model already has a memory adapter; load the base model again for a new one")
    settings = settings or AdapterSettings()
    torch.manual_seed(seed)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.targets), bias="none")
    inject_adapter_in_model(config, model)
    from peft.tuners.lora import LoraLayer

    object.__setattr__(model, MARK, tuple(m for m in model.modules() if isinstance(m, LoraLayer)))
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    layers = _lora_layers(model)
    _switch(layers, [True] * len(layers))  # off by default; adapter_active() switches it on
    if not params:
        raise InputError(f"no layer of this model is named {', '.join(settings.targets)}; "
                         "give --adapter-targets that exist in its decoder blocks")
    return params


@contextlib.contextmanager
def adapter_active(model: nn.Module) -> Iterator[None]:
    """Switch the model's memory adapter on inside the block (nothing happens without one)."""
    layers = _lora_layers(model)
    before = [layer.disable_adapters for layer in layers]
    _switch(layers, [False] * len(layers))
    try:
        yield
    finally:
        _switch(layers, before)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights alone (what a checkpoint stores)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model: nn.Module, folder: str | Path, info: AdapterInfo) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` into ``folder`` (each file replaced atomically)."""
    from safetensors.torch import save_file

    from kvmap.fileio import write_json_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS + ".tmp")
    save_file({k: v.to(torch.float16) for k, v in adapter_state(model).items()}, str(tmp))
    tmp.replace(folder / WEIGHTS)
    write_json_atomic(folder / SETTINGS, {"base_model_id": info.base_model_id, "settings": asdict(info.settings),
                                          "training": info.training}, indent=2)
    return folder


def read_info(folder: str | Path) -> AdapterInfo:
    """``adapter.json`` of a checkpoint folder, checked; a one-line ModelLoadError for anything wrong."""
    folder = Path(folder)
    path = folder / SETTINGS
    if not path.is_file() or not (folder / WEIGHTS).is_file():
        raise ModelLoadError(f"{folder} is not a kvmap adapter (it needs {SETTINGS} and {WEIGHTS}); "
                             "give the folder `kvmap finetune` wrote")
    try:
        raw = json.loads(path.read_text())
        settings = AdapterSettings(**{k: tuple(v) if k == "targets" else v for k, v in raw["settings"].items()})
        return AdapterInfo(str(raw["base_model_id"]), settings, dict(raw.get("training", {})))
    except (ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{path}: not a kvmap adapter settings file ({err})") from None


def load_adapter(model: nn.Module, folder: str | Path, model_id: str) -> AdapterInfo:
    """Inject the checkpoint's LoRA layers into ``model`` (base model ``model_id``) and load its weights."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_info(folder)
    if info.base_model_id != model_id:
        raise ModelLoadError(f"adapter {folder} was trained on '{info.base_model_id}', not on '{model_id}'; "
                             "load the model it was trained on")
    try:
        state = load_file(str(Path(folder) / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{folder}/{WEIGHTS}: cannot read the adapter weights ({err})") from None
    add_adapter(model, info.settings)
    dtype = next(model.parameters()).dtype
    result = set_peft_model_state_dict(model, {k: v.to(dtype) for k, v in state.items()})
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing or getattr(result, "unexpected_keys", []):
        raise ModelLoadError(f"adapter {folder} does not fit this model ({len(missing)} LoRA weights missing, "
                             f"{len(result.unexpected_keys)} unexpected)")
    for p in model.parameters():
        p.requires_grad_(False)
    return info
