"""One-call drivers behind ``kvmap bridge train`` and ``kvmap bridge eval``: fit an adapter, score every baseline, plot.

A task's folder (``runs/bridges/TASK``) holds ``adapter.safetensors`` (the adapter alone),
``metrics.csv`` (Lightning's CSV log), ``training.png`` and ``metrics.json`` (held-out accuracy
per condition with 95% Wilson intervals). ``kvmap report`` turns the last into RESULTS.md.
"""
from __future__ import annotations

import copy
import csv
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kvmap.bridges.adapters import KVAdapter
from kvmap.fileio import write_json_atomic
from kvmap.stats import wilson
from kvmap.training.bridge import CONDITIONS, BridgeDataModule, BridgeModule


def train_bridge(module: BridgeModule, data: BridgeDataModule, out: Path, max_steps: int = 200,
                 val_every: int = 50) -> Path:
    """Fit ``module``'s adapter on ``data`` (CPU), log to ``out/metrics.csv``, save ``out/adapter.safetensors``."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    out.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=CSVLogger(out, name="", version=""),
                         callbacks=[ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0)],
                         val_check_interval=min(val_every, max_steps), check_val_every_n_epoch=None,
                         log_every_n_steps=5, num_sanity_val_steps=0, enable_model_summary=False)
    began = time.perf_counter()
    trainer.fit(module, data)
    path = module.adapter.save(out / "adapter.safetensors")
    write_json_atomic(out / "training.json", {"steps": trainer.global_step, "seconds": round(time.perf_counter() - began, 1),
                                              "hparams": dict(module.hparams), "data": dict(data.hparams)}, indent=2)
    plot_curves(out / "metrics.csv", out / "training.png", f"bridge {module.task}: adapter training")
    return path


def evaluate_bridge(module: BridgeModule, data: BridgeDataModule, adapter: Path | None, out: Path) -> dict:
    """Held-out accuracy of ``module.task`` under every condition, on the same test examples."""
    untrained = copy.deepcopy(module.adapter)  # the module's seeded initialisation: the `random` baseline
    if adapter is not None:
        trained = KVAdapter.load(adapter, source_id=module.adapter.source_id, target_id=module.adapter.target_id)
        module.adapter.load_state_dict(trained.state_dict())
    examples = data.split("test")
    results = {}
    for condition in CONDITIONS[module.task]:
        if condition == "bridge" and adapter is None:
            continue
        began, correct = time.perf_counter(), []
        for i in tqdm(range(0, len(examples), data.batch_size), desc=f"{module.task} {condition}", leave=False):
            with torch.no_grad():
                _, ok = module.run(examples[i:i + data.batch_size], condition,
                                   untrained if condition == "random" else None)
            correct += ok.tolist()
        kinds = sorted({ex.kind for ex in examples})
        by_kind = {k: sum(c for c, ex in zip(correct, examples) if ex.kind == k) / max(1, sum(ex.kind == k for ex in examples))
                   for k in kinds}
        n, hits = len(correct), int(sum(correct))
        low, high = wilson(hits, n)
        results[condition] = {"n": n, "correct": hits, "accuracy": hits / n, "ci95": [low, high],
                              "by_kind": by_kind, "seconds": round(time.perf_counter() - began, 1)}
    chance = {"vision-text": "1/4 (colour) and 1/2 (left/right)", "text-text": "1/4",
              "text-limb": "share of reaches that land on the target by luck"}[module.task]
    metrics = {"task": module.task, "source": module.adapter.source_id, "target": module.adapter.target_id,
               "adapter": str(adapter) if adapter else None, "test_seed": data.seed + 2, "chance": chance,
               "hparams": dict(module.hparams), "results": results}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "metrics.json", metrics, indent=2)
    return metrics


def plot_curves(csv_path: Path, png: Path, title: str) -> None:
    """Training and validation loss/accuracy against step, from Lightning's CSV log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(csv_path)))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-"), ("val", "o-")):
            pts = [(int(r["step"]), float(r[f"{split}/{metric}"])) for r in rows if r.get(f"{split}/{metric}")]
            if pts:
                ax.plot(*zip(*pts), style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
