"""Memory-aware fine-tuning (``kvmap finetune``): a LoRA adapter trained with memory import in the forward pass.

The seed paper's next step: *"This mechanism can probably be improved when the model is trained
(another fine tuning step maybe) with that mechanism in place."* The base model stays frozen; only the
adapter (:mod:`kvmap.models.adapter`, active only while importing) learns. Each step's examples
(:mod:`kvmap.training.memory_data`) hold memories the base model exported (no gradient reaches them)
mixed with hard negatives from other stories; the loss is the answer tokens' cross-entropy with the
seed's token-level import active, so gradients reach the adapter through the attention over the
retrieved memories and everything after it.

A run folder holds ``metrics.csv`` (Lightning's CSV logs of every attempt, merged), ``checkpoints/last.ckpt`` (adapter and
optimizer: a stopped run resumes from it), ``adapter/`` (the adapter alone, what ``--adapter`` loads),
``training.png`` and ``training.json``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kvmap.config import ImportConfig
from kvmap.models.adapter import (SETTINGS, WEIGHTS, AdapterInfo, AdapterSettings, adapter_active, add_adapter,
                                  save_adapter)
from kvmap.training.memory_data import DataSettings, TuningData, TuningExample


class _Steps(Dataset):
    """Step numbers only: a step's examples follow from the trainer's global step (see ``training_step``),
    so a resumed run continues with new examples instead of repeating the epoch's first ones."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class MemoryTuning(pl.LightningModule):
    """The adapter's training loop; the frozen model and the data live outside the parameter registry,
    so checkpoints and the optimizer hold the LoRA weights alone."""

    def __init__(self, lm, params: list[torch.nn.Parameter], data: TuningData, config: ImportConfig | None = None,
                 lr: float = 5e-4, warmup: int = 20, batch_size: int = 4, max_steps: int = 500):
        super().__init__()
        self.lm, self.data = lm, data
        self.config = config or ImportConfig()
        self.lora = torch.nn.ParameterList(params)  # the model's own LoRA tensors (shared, not copied)
        self.lr, self.warmup, self.batch_size, self.max_steps = lr, warmup, batch_size, max_steps
        self.spent = {"wall_s": 0.0, "cpu_s": 0.0}  # training time of earlier attempts (from the checkpoint)
        self._began = (time.perf_counter(), time.process_time())

    def on_train_start(self) -> None:
        self._began = (time.perf_counter(), time.process_time())

    def seconds(self) -> dict:
        """Wall and CPU seconds of training over every attempt so far (validation included, the pool's build not)."""
        # milliseconds, not tenths: a short resumed attempt must still add up (reports round for display)
        return {"wall_s": round(self.spent["wall_s"] + time.perf_counter() - self._began[0], 3),
                "cpu_s": round(self.spent["cpu_s"] + time.process_time() - self._began[1], 3)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kvmap_seconds"] = self.seconds()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.spent = dict(checkpoint.get("kvmap_seconds", self.spent))

    def example_loss(self, ex: TuningExample) -> tuple[torch.Tensor, bool]:
        """Cross-entropy of the answer tokens with the memory imported (or, in splice mode, with the chosen blocks
        spliced into the prompt), and whether greedy decoding (teacher-forced) gets every answer token right."""
        n = len(ex.target_ids)
        if ex.splice_ids is not None:
            logits = self._spliced_logits(ex)
        else:
            with self.lm.port.importing(ex.memory, self.config):
                logits = self.lm.model(input_ids=ex.input_ids, logits_to_keep=n + 1).logits[0, :-1]  # (n, V)
        target = torch.tensor(ex.target_ids)
        return F.cross_entropy(logits.float(), target), bool((logits.argmax(-1) == target).all())

    def _spliced_logits(self, ex: TuningExample) -> torch.Tensor:
        """(n, V) logits of the answer tokens read after the spliced blocks, the adapter on throughout, as
        ``kvmap ask`` answers with it. The prompt up to the blocks and the blocks themselves (stored K/V, no
        gradient: a memory is what the base model wrote) form the cache; the loss reaches the adapter through
        the question and answer tokens read over it."""
        from kvmap.splice import spliced_cache

        n = len(ex.target_ids)
        rest = torch.tensor(ex.prompt_ids[ex.splice_at:] + ex.target_ids)[None]  # (1, T)
        with adapter_active(self.lm.model):
            with torch.no_grad():
                cache, _ = spliced_cache(self.lm.port, ex.memory, ex.prompt_ids[:ex.splice_at], ex.splice_ids)
            return self.lm.model(input_ids=rest, cache=cache, use_cache=True, logits_to_keep=n + 1).logits[0, :-1]

    def training_step(self, batch, batch_idx):
        step = self.global_step
        losses, right = [], 0
        for j in range(self.batch_size):
            loss, ok = self.example_loss(self.data.example("train", step * self.batch_size + j))
            losses.append(loss)
            right += ok
        loss = torch.stack(losses).mean()
        self.log_dict({"train/loss": loss.detach(), "train/accuracy": right / self.batch_size},
                      on_step=True, batch_size=self.batch_size)
        return loss

    def validation_step(self, batch, batch_idx):
        with torch.no_grad():
            loss, ok = self.example_loss(self.data.example("val", int(batch)))
        self.log_dict({"val/loss": loss, "val/accuracy": float(ok)}, on_epoch=True, batch_size=1)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.lora.parameters(), lr=self.lr, weight_decay=0.0)

        def factor(step: int) -> float:  # linear warm-up, then cosine to a tenth
            if step < self.warmup:
                return (step + 1) / self.warmup
            done = min(1.0, (step - self.warmup) / max(1, self.max_steps - self.warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}


def merge_logs(out: Path) -> Path:
    """``out/metrics.csv`` from every attempt's log (``out/logs/version_N``), a later attempt's rows replacing
    an earlier one's from the same step on (a resumed run repeats the steps after its last checkpoint)."""
    import csv

    rows: list[dict] = []
    versions = sorted((out / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    for path in versions:
        new = list(csv.DictReader(open(path, newline="")))
        steps = [int(r["step"]) for r in new if r.get("step")]
        if steps:
            rows = [r for r in rows if int(r["step"]) < min(steps)]
        rows += new
    fields = sorted({k for r in rows for k in r})
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return out / "metrics.csv"


def finished(out: Path, steps: int) -> bool:
    """Whether ``out`` holds a run that trained ``steps`` steps or more *and* its adapter's weights; a record
    without them (a clone where the weights were not kept) trains anew, a larger ``steps`` trains on."""
    import json

    try:
        trained = int(json.loads((out / "training.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return trained >= steps and all((out / "adapter" / name).is_file() for name in (SETTINGS, WEIGHTS))


def finetune(out: str | Path, model: str | None = None, steps: int = 500, batch_size: int = 4, lr: float = 5e-4,
             settings: AdapterSettings | None = None, data_settings: DataSettings | None = None,
             n_val: int = 24, val_every: int = 50, lm=None, progress: bool = True) -> Path:
    """Train (or finish training) a memory adapter into ``out``; returns the adapter folder.

    A run stopped at any point continues from ``out/checkpoints/last.ckpt`` (saved every ``val_every``
    steps) with the same settings; a finished one returns at once, or trains on if ``steps`` is larger.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from kvmap.models.loading import cache_dir, load_model
    from kvmap.reader import ReaderConfig
    from kvmap.training.memory_data import build_pool, pool_key, train_stories
    from kvmap.training.run import plot_curves

    out = Path(out)
    if finished(out, steps):
        return out / "adapter"
    settings, data_settings = settings or AdapterSettings(), data_settings or DataSettings()
    stories = train_stories(data_settings.n_stories, data_settings.seed)  # checked before the model loads
    lm = lm or load_model(model)
    params = add_adapter(lm.model, settings, seed=data_settings.seed)
    reader = ReaderConfig()
    pool = build_pool(lm, stories, cache_dir() / "finetune" / f"pool-{pool_key(lm.model_id, data_settings, reader)}",
                      reader, progress=progress)
    data = TuningData(lm, pool, stories, data_settings)
    module = MemoryTuning(lm, params, data, lr=lr, batch_size=batch_size, max_steps=steps)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "checkpoints" / "last.ckpt"
    # one log folder per attempt (Lightning's CSV logger empties an existing one), merged at the end
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=CSVLogger(out, name="logs"),
                         callbacks=[ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                                                    every_n_train_steps=val_every)],
                         val_check_interval=val_every, check_val_every_n_epoch=None, log_every_n_steps=1,
                         num_sanity_val_steps=0, enable_model_summary=False, enable_progress_bar=progress,
                         limit_val_batches=n_val)
    train = DataLoader(_Steps(steps), batch_size=None)
    val = DataLoader(_Steps(n_val), batch_size=None)
    began = time.perf_counter()
    if not last.is_file():
        trainer.validate(module, val, verbose=False)  # step 0: the base model (LoRA B = 0)
    trainer.fit(module, train, val, ckpt_path=str(last) if last.is_file() else None)
    seconds = time.perf_counter() - began
    training = {"steps": trainer.global_step, "batch_size": batch_size, "lr": lr, "seconds_this_run": round(seconds, 1),
                **{f"train_{k}": v for k, v in module.seconds().items()},
                "data": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(data_settings).items()},
                "import": module.config.options(), "stories": [s["story"] for s in stories]}
    folder = save_adapter(lm.model, out / "adapter", AdapterInfo(lm.model_id, settings, training))
    merge_logs(out)
    how = "spliced blocks" if data_settings.mode == "splice" else "import"
    plot_curves(out / "metrics.csv", out / "training.png", f"memory adapter: training with {how} in the forward pass")
    from kvmap.fileio import write_json_atomic

    write_json_atomic(out / "training.json", training, indent=2)
    return folder
