"""Train and evaluate bridge adapters with Lightning: frozen models, only the adapter learns.

The frozen models live outside the module's parameter registry, so optimizers, checkpoints and
``state_dict`` hold the adapter alone. One step: the source model exports K/V for each example,
the adapter maps them, and the target model imports them and is scored:

- text target (``vision-text``, ``text-text``): negative log-probability of the right answer word
  (either casing) at the prompt's last position; accuracy = the right choice scores highest among
  the choices;
- limb target (``text-limb``): MSE of the predicted joint sin/cos; accuracy = the gripper lands
  within :data:`kvmap.arm.REACH_TOLERANCE` pixels of the named object.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kvmap.bridges.adapters import KV, KVAdapter
from kvmap.bridges.connect import import_config
from kvmap.bridges.tasks import BridgeExample, make_examples
from kvmap.errors import InputError
from kvmap.stores.tensor import TensorMemory, recording

CONDITIONS = {
    "vision-text": ("bridge", "random", "none", "oracle"),
    "text-text": ("bridge", "random", "none", "oracle"),
    "text-limb": ("bridge", "random", "none", "direct"),
}
"""What each task is evaluated under: the trained adapter, an untrained one, no bridge, and the
ceiling (the scene or fact in words in the prompt; the limb model given the target directly)."""


@dataclass
class _TextSide:
    """A loaded LLM used as a bridge side."""

    lm: object  # kvmap.models.loading.LoadedModel

    @property
    def port(self):
        return self.lm.port

    def export(self, text: str) -> KV:
        """The model's K/V for ``text`` (B=1), no gradients (the model is frozen)."""
        ids = self.lm.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad(), recording(self.port) as kv:
            self.lm.model(ids)
        return kv

    def prompt_ids(self, ex: BridgeExample, with_oracle: bool) -> torch.Tensor:
        context = f"{ex.oracle_text}\n" if with_oracle else ""
        return self.lm.tokenizer(f"{context}Question: {ex.question}\nAnswer:", return_tensors="pt").input_ids

    def choice_scores(self, logits: torch.Tensor, ex: BridgeExample) -> torch.Tensor:
        """(n_choices,) log-probability of each choice's first token, any casing.

        Casing matters: Gemma 3 answers " Red" where SmolLM2 answers " red", so a choice scores the
        log-sum-exp over its " red" / " Red" first tokens.
        """
        logp = logits.log_softmax(-1)
        scores = []
        for c in ex.choices:
            ids = {self.lm.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in (c, c.capitalize())}
            scores.append(logp[sorted(ids)].logsumexp(0))
        return torch.stack(scores)

    def last_logits(self, ids: torch.Tensor, memory=None, config=None) -> torch.Tensor:
        """(V,) next-token logits after ``ids``, importing ``memory`` when given."""
        ctx = self.port.importing(memory, config) if memory is not None else contextlib.nullcontext()
        with ctx:
            return self.lm.model(ids, logits_to_keep=1).logits[0, -1]


@dataclass
class _LimbSide:
    """The limb-control policy used as a bridge side."""

    policy: torch.nn.Module

    @property
    def port(self):
        return self.policy.port()

    def export(self, images: torch.Tensor) -> KV:
        """Per-layer K/V (B, H, N, d) of the scenes, seen with no instruction."""
        with torch.no_grad(), recording(self.port) as kv:
            self.policy(images, torch.zeros(len(images), dtype=torch.long))
        return kv


def _split(kv: KV, i: int) -> KV:
    return {layer: (k[i:i + 1], v[i:i + 1]) for layer, (k, v) in kv.items()}


class BridgeModule(pl.LightningModule):
    """Adapter training for one bridged task (see :mod:`kvmap.bridges.tasks`).

    Parameters
    ----------
    task : ``vision-text``, ``text-limb`` or ``text-text``
    text_model : the LLM side (name or checkpoint folder, as ``kvmap --model``)
    target_text_model : text-text only: the LLM that imports the other's memory
    limb_checkpoint : the trained limb policy (``kvmap limb train`` writes it)
    lr : AdamW learning rate of the adapter
    weight_decay : AdamW weight decay
    distance : how far behind a text target's queries the bridged entries sit
    seed : seed of the adapter's initialisation (the ``random`` baseline uses the same one)
    """

    def __init__(self, task: str = "vision-text", text_model: str = "smollm2-135m",
                 target_text_model: str = "gemma3-270m", limb_checkpoint: str = "~/.cache/kvmap/limb/limb.ckpt",
                 lr: float = 1e-3, weight_decay: float = 0.0, distance: int = 4096, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        source, target = load_sides(task, text_model, target_text_model, limb_checkpoint)
        # plain holders (not nn.Modules): the frozen models stay out of parameters(), state_dict() and checkpoints
        self.source, self.target = source, target
        self.task, self.distance = task, distance
        torch.manual_seed(seed)
        sp, tp = source.port, target.port
        self.adapter = KVAdapter(sp.layout, tp.layout, source_id=sp.model_id, target_id=tp.model_id)
        self._text_cache: dict[str, KV] = {}

    # -- the bridged forward ----------------------------------------------------------------

    def source_exports(self, batch: list[BridgeExample]) -> list[KV]:
        """Each example's source K/V (B=1 each); text sources are cached per distinct text."""
        if isinstance(self.source, _LimbSide):
            kv = self.source.export(torch.stack([ex.image for ex in batch]))
            return [_split(kv, i) for i in range(len(batch))]
        for ex in batch:
            if ex.source_text not in self._text_cache:
                self._text_cache[ex.source_text] = self.source.export(ex.source_text)
        return [self._text_cache[ex.source_text] for ex in batch]

    def run(self, batch: list[BridgeExample], condition: str = "bridge",
            adapter: KVAdapter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss (scalar) and per-example correctness (B,) under ``condition`` (see :data:`CONDITIONS`)."""
        adapter = adapter or self.adapter
        imports = condition in ("bridge", "random")
        exports = self.source_exports(batch) if imports else [None] * len(batch)
        tp = self.target.port
        memories = [TensorMemory(tp.layout, tp.model_id, adapter(kv)) if kv is not None else None for kv in exports]
        if isinstance(self.target, _LimbSide):
            return self._run_limb(batch, memories, direct=condition == "direct")
        return self._run_text(batch, memories, adapter, oracle=condition == "oracle")

    def _run_text(self, batch, memories, adapter, oracle: bool):
        config = import_config(adapter, self.distance)
        losses, correct = [], []
        for ex, memory in zip(batch, memories):
            logits = self.target.last_logits(self.target.prompt_ids(ex, oracle), memory, config)  # (V,)
            scores = self.target.choice_scores(logits, ex)
            losses.append(-scores[ex.answer])
            correct.append(float(int(scores.argmax()) == ex.answer))
        return torch.stack(losses).mean(), torch.tensor(correct)

    def _run_limb(self, batch, memories, direct: bool):
        from kvmap.arm import REACH_TOLERANCE, reach_error

        images = torch.stack([ex.image for ex in batch])
        targets = torch.tensor([ex.target if direct else 0 for ex in batch])
        if memories[0] is None:
            pred = self.target.policy(images, targets)
        else:  # one memory per example: the ViT port broadcasts a B=1 memory, so go one by one
            preds = []
            for i, memory in enumerate(memories):
                with self.target.port.importing(memory):
                    preds.append(self.target.policy(images[i:i + 1], targets[i:i + 1]))
            pred = torch.cat(preds)
        loss = F.mse_loss(pred, torch.stack([ex.angles for ex in batch]))
        error = reach_error(pred.detach(), torch.stack([ex.goal for ex in batch]))
        return loss, (error <= REACH_TOLERANCE).float()

    # -- Lightning hooks --------------------------------------------------------------------

    def training_step(self, batch, _):
        loss, correct = self.run(batch)
        self.log_dict({"train/loss": loss, "train/accuracy": correct.mean()}, batch_size=len(batch), prog_bar=True)
        return loss

    def validation_step(self, batch, _):
        with torch.no_grad():
            loss, correct = self.run(batch)
        self.log_dict({"val/loss": loss, "val/accuracy": correct.mean()}, batch_size=len(batch), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.adapter.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


def load_sides(task: str, text_model: str, target_text_model: str, limb_checkpoint: str):
    """(source, target) sides of ``task``, frozen and in eval mode."""
    from kvmap.models.loading import load_model

    def text(name):
        lm = load_model(name)
        lm.model.requires_grad_(False)
        return _TextSide(lm)

    def limb():
        from kvmap.training.limb import load_limb

        policy = load_limb(Path(limb_checkpoint).expanduser()).eval()
        policy.requires_grad_(False)
        return _LimbSide(policy)

    if task == "vision-text":
        return limb(), text(text_model)
    if task == "text-limb":
        return text(text_model), limb()
    if task == "text-text":
        return text(text_model), text(target_text_model)
    raise InputError(f"unknown bridge task '{task}'; choose vision-text, text-limb or text-text")


class BridgeDataModule(pl.LightningDataModule):
    """Train / val / test examples of one bridged task, each split from its own seed.

    Parameters
    ----------
    task : the bridged task (must match the module's)
    n_train, n_val, n_test : examples per split
    batch_size : examples per optimizer step
    seed : train uses ``seed``, val ``seed + 1``, test ``seed + 2``
    """

    def __init__(self, task: str = "vision-text", n_train: int = 1000, n_val: int = 64, n_test: int = 200,
                 batch_size: int = 8, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.task, self.batch_size = task, batch_size
        self.sizes, self.seed = {"train": n_train, "val": n_val, "test": n_test}, seed
        self._splits: dict[str, list[BridgeExample]] = {}

    def split(self, name: str) -> list[BridgeExample]:
        if name not in self._splits:
            offset = {"train": 0, "val": 1, "test": 2}[name]
            self._splits[name] = make_examples(self.task, self.sizes[name], self.seed + offset)
        return self._splits[name]

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.split(name), batch_size=self.batch_size, shuffle=shuffle, collate_fn=list)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)


class SaveAdapter(pl.Callback):
    """At the end of fit, write the adapter alone to ``path`` (default: the logger's folder/adapter.safetensors)."""

    def __init__(self, path: str | None = None):
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if isinstance(getattr(module, "adapter", None), KVAdapter):
            folder = Path(trainer.log_dir or trainer.default_root_dir)
            module.adapter.save(Path(self.path) if self.path else folder / "adapter.safetensors")
