"""``python -m kvmap.training fit --config configs/bridge-vision-text.yaml``: Lightning's CLI over kvmap's modules.

Any LightningModule / LightningDataModule pair works (``class_path`` in the YAML): the bridge
adapters (:mod:`kvmap.training.bridge`) or the limb policy (:mod:`kvmap.training.limb`).
"""
from lightning.pytorch.cli import LightningCLI


def main() -> None:
    LightningCLI(subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
