"""A tiny end-to-end adapter training through the Lightning CLI, on the real SmolLM2 (CPU, ~1 min)."""
from __future__ import annotations

import csv

import pytest
import torch

from kvmap.bridges import KVAdapter

pytestmark = pytest.mark.slow  # loads the real SmolLM2 and trains through Lightning


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Fit a SmolLM2 -> SmolLM2 text-text adapter for 8 steps on one batch of 4 facts, via the CLI."""
    from kvmap.training.__main__ import main

    out = tmp_path_factory.mktemp("bridge")
    args = ["fit", "--config", "configs/bridge-text-text.yaml",
            "--model.target_text_model", "smollm2-135m", "--model.lr", "0.01",
            "--data.n_train", "4", "--data.n_val", "4", "--data.batch_size", "4",
            "--trainer.max_steps", "8", "--trainer.val_check_interval", "8", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(out)]
    import sys

    argv, sys.argv = sys.argv, ["kvmap.training", *args]
    try:
        main()
    finally:
        sys.argv = argv
    return out


def test_training_lowers_the_loss(trained):
    rows = list(csv.DictReader(open(trained / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 6
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses


def test_checkpoints_and_exports_hold_the_adapter_alone(trained):
    adapter = KVAdapter.load(trained / "adapter.safetensors", source_id="smollm2-135m-instruct",
                             target_id="smollm2-135m-instruct")
    assert adapter.target_layers == list(range(30))
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False) \
        if (trained / "checkpoints").exists() else None
    if ckpt is None:  # ModelCheckpoint writes under the logger folder when no dirpath is given
        found = list(trained.rglob("last.ckpt"))
        assert found, "no last.ckpt written"
        ckpt = torch.load(found[0], map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("adapter.") for k in ckpt["state_dict"])
    n_params = sum(v.numel() for v in ckpt["state_dict"].values())
    assert n_params == sum(p.numel() for p in adapter.parameters())  # no frozen model weights in the file
