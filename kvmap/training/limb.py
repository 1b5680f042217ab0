"""Training the limb-control policy (:class:`kvmap.models.limb.LimbPolicy`) with Lightning.

``train_limb`` is what ``kvmap limb train`` runs; ``configs/limb.yaml`` does the same training
through Lightning's CLI (``python -m kvmap.training fit --config configs/limb.yaml``).
A checkpoint (``limb.ckpt``) holds only the policy: its config and its state_dict.
"""
from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from kvmap.arm import REACH_TOLERANCE, ReachDataset, reach_error
from kvmap.errors import InputError
from kvmap.fileio import write_bytes_atomic
from kvmap.models.limb import LimbPolicy

DEFAULT_CHECKPOINT = Path("~/.cache/kvmap/limb/limb.ckpt")
"""Where ``kvmap limb train`` puts the policy and the bridges look for it."""
CHECKPOINT_FORMAT = "kvmap-limb/1"


class LimbModule(pl.LightningModule):
    """The policy trained to regress the reaching pose: MSE on (sin t1, cos t1, sin t2, cos t2).

    Parameters
    ----------
    embed_dim : width of the ViT.
    depth : number of ViT blocks.
    num_heads : attention heads per block.
    patch_size : side of a square patch in pixels (64 / patch_size patches per image side).
    qk_norm : LayerNorm on queries and keys (keeps a short run from stalling, see ``LimbPolicy``).
    lr : peak learning rate of AdamW.
    weight_decay : AdamW weight decay on matrices (not on biases, norms, embeddings or tokens).
    warmup_steps : linear warm-up before the cosine decay to ``min_lr_ratio * lr`` at the last step.
    min_lr_ratio : final learning rate as a share of ``lr``.
    """

    def __init__(self, embed_dim: int = 192, depth: int = 6, num_heads: int = 3, patch_size: int = 8,
                 qk_norm: bool = True, lr: float = 2e-3, weight_decay: float = 0.05, warmup_steps: int = 100,
                 min_lr_ratio: float = 0.02):
        super().__init__()
        self.save_hyperparameters()
        self.policy = LimbPolicy(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                 qk_norm=qk_norm)

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.policy(images, target)

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        pred = self.policy(batch["image"], batch["target"])  # (B, 4)
        loss = F.mse_loss(pred, batch["angles"])
        on_step = split == "train"
        self.log(f"{split}/loss", loss, on_step=on_step, on_epoch=not on_step, prog_bar=True,
                 batch_size=len(pred))
        if split != "train":
            error = reach_error(pred, batch["target_xy"])  # (B,) pixels
            self.log(f"{split}/reach_acc", (error <= REACH_TOLERANCE).float().mean(), prog_bar=True,
                     batch_size=len(pred))
            self.log(f"{split}/reach_px", error.mean(), batch_size=len(pred))
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.policy.named_parameters():
            plain = p.ndim < 2 or "token" in name or "pos" in name or name.startswith("instruction.")
            (no_decay if plain else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr)
        total = max(int(self.trainer.estimated_stepping_batches), 1)

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min((step - hp.warmup_steps) / max(total - hp.warmup_steps, 1), 1.0)
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ReachDataModule(pl.LightningDataModule):
    """Synthetic reach scenes; the splits come from different seeds, so they never share a scene.

    Parameters
    ----------
    train_size : training scenes (rendered on the fly, so a large number costs no memory).
    val_size : validation scenes.
    test_size : held-out test scenes.
    batch_size : scenes per batch.
    train_seed : seed of the training scenes.
    val_seed : seed of the validation scenes.
    test_seed : seed of the test scenes.
    p_none : share of scenes with no instruction (the label is then the arm's current pose).
    num_workers : DataLoader worker processes (0: render in the training process).
    """

    def __init__(self, train_size: int = 100_000, val_size: int = 512, test_size: int = 1000, batch_size: int = 32,
                 train_seed: int = 0, val_seed: int = 1, test_seed: int = 2, p_none: float = 0.2,
                 num_workers: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.train_set = ReachDataset(train_size, train_seed, p_none)
        self.val_set = ReachDataset(val_size, val_seed, p_none)
        self.test_set = ReachDataset(test_size, test_seed, p_none)

    def _loader(self, dataset: ReachDataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def save_limb(policy: LimbPolicy, path: Path, metrics: dict | None = None) -> Path:
    """Write the policy's config and state_dict to ``path`` atomically (:func:`kvmap.fileio.write_bytes_atomic`)."""
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "config": dict(policy.config),
                "state_dict": {k: v.detach().cpu() for k, v in policy.state_dict().items()},
                "metrics": dict(metrics or {})}, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def load_limb(path: Path | str = DEFAULT_CHECKPOINT) -> LimbPolicy:
    """The trained policy from a checkpoint written by :func:`train_limb` (in eval mode, on CPU)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"no limb policy at {path}; run `kvmap limb train` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        ckpt = None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:  # explicit: python -O strips asserts
        raise InputError(f"{path} is not a limb policy checkpoint; run `kvmap limb train` to write one")
    policy = LimbPolicy(**ckpt["config"])
    policy.load_state_dict(ckpt["state_dict"])
    return policy.eval()


def train_limb(out: Path, max_steps: int = 700, batch_size: int = 32, lr: float = 2e-3, warmup_steps: int = 100,
               train_size: int = 100_000, val_size: int = 512, test_size: int = 1000, val_every: int = 250,
               seed: int = 0, progress: bool = False) -> Path:
    """Train the policy on CPU and write ``out/limb.ckpt``; logs (CSV) go under ``out/``.

    Parameters
    ----------
    out : folder for the checkpoint and the CSV logs.
    max_steps : optimizer steps (the cosine schedule ends there).
    batch_size, lr, warmup_steps, train_size, val_size, test_size : see :class:`ReachDataModule` and
        :class:`LimbModule`.
    val_every : validate every this many steps (and at the end).
    seed : seeds the model's initialisation and the training data order.
    progress : show Lightning's progress bar.

    Returns
    -------
    Path of the checkpoint; its ``metrics`` hold the held-out test loss and reach accuracy.
    """
    from lightning.pytorch.loggers import CSVLogger

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, verbose=False)
    module = LimbModule(lr=lr, warmup_steps=warmup_steps)
    data = ReachDataModule(train_size=train_size, val_size=val_size, test_size=test_size, batch_size=batch_size)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=CSVLogger(out, name="logs"),
                         enable_checkpointing=False, val_check_interval=min(val_every, max_steps),
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=10,
                         enable_progress_bar=progress, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    return save_limb(module.policy, out / "limb.ckpt", {k: float(v) for k, v in metrics.items()})


class SaveLimb(pl.Callback):
    """Write the policy checkpoint (:func:`save_limb`) when fitting ends, for LightningCLI runs.

    Parameters
    ----------
    path : where to write it; ``~`` is expanded.
    """

    def __init__(self, path: str = str(DEFAULT_CHECKPOINT)):
        self.path = Path(path).expanduser()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: LimbModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        save_limb(pl_module.policy, self.path, metrics)
