"""The synthetic arm world, the limb policy and its training (tiny sizes, CPU)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kvmap.errors import InputError
from kvmap import arm
from kvmap.arm import (BASE, COLOURS, LINKS, OBJECT_RADIUS, ReachDataset, Scene, angle_features, forward_kinematics,
                       nearest_colour, pointing, random_scene, reach_angles, reach_error, render, render_batch)
from kvmap.models.limb import LimbPolicy
from kvmap.models.vit import ViTMemoryPort
from kvmap.training.limb import LimbModule, ReachDataModule, load_limb, save_limb

TINY = dict(embed_dim=48, depth=2, num_heads=3)


def test_the_world_is_deterministic_from_the_seed():
    a, b, other = ReachDataset(6, seed=5), ReachDataset(6, seed=5), ReachDataset(6, seed=6)
    for i in range(6):
        x, y = a[i], b[i]
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a[0]["image"], other[0]["image"])
    s1, s2 = random_scene(np.random.default_rng(3)), random_scene(np.random.default_rng(3))
    assert s1.colours == s2.colours and s1.angles == s2.angles and np.array_equal(s1.positions, s2.positions)


def test_scenes_follow_the_rules():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = random_scene(rng)
        assert len(set(s.colours)) == 3 and set(s.colours) <= set(COLOURS)
        radius = np.hypot(*(s.positions - BASE).T)
        assert (radius >= abs(LINKS[0] - LINKS[1])).all() and (radius <= sum(LINKS)).all()
        gaps = [np.hypot(*(p - q)) for i, p in enumerate(s.positions) for q in s.positions[i + 1:]]
        assert min(gaps) >= 2 * OBJECT_RADIUS
        assert s.target is None or s.target in s.colours


def test_inverse_then_forward_kinematics_lands_on_the_target():
    rng = np.random.default_rng(1)
    r = rng.uniform(abs(LINKS[0] - LINKS[1]) + 0.1, sum(LINKS) - 0.1, 500)
    phi = rng.uniform(-math.pi, math.pi, 500)
    xy = np.stack([BASE[0] + r * np.cos(phi), BASE[1] + r * np.sin(phi)], -1)  # (500, 2)
    angles = reach_angles(xy)
    assert np.abs(forward_kinematics(angles) - xy).max() < 1e-6
    assert (angles[:, 1] >= 0).all() and (angles[:, 1] <= math.pi).all()  # one elbow solution
    torch_xy = forward_kinematics(torch.tensor(angles))
    assert torch.allclose(torch_xy, torch.tensor(xy), atol=1e-6)
    # the features the policy predicts map back onto the target
    feats = torch.tensor(angle_features(angles))
    assert reach_error(feats, torch.tensor(xy)).max() < 1e-4
    # a scene without instruction asks for the current pose
    s = random_scene(np.random.default_rng(2), p_none=1.0)
    assert s.target is None and np.allclose(reach_angles(s), s.angles)


def test_rendering_shapes_ranges_and_content():
    ds = ReachDataset(8, seed=0)
    scenes = [ds.scene(i) for i in range(8)]
    images = render_batch(scenes)
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.allclose(render(scenes[3]), images[3])
    s = scenes[0]
    x, y = (int(v) for v in s.positions[0])  # an object's centre pixel has its colour
    assert torch.allclose(images[0, :, y, x], torch.tensor(arm.RGB[s.colours[0]]))
    gx, gy = (int(v) for v in s.gripper)
    assert torch.allclose(images[0, :, gy, gx], torch.ones(3))  # the white gripper dot
    assert images[0, :, 0, 0].sum() == 0  # black background
    item = ds[0]
    assert item["angles"].shape == (4,) and item["target_xy"].shape == (2,) and item["positions"].shape == (3, 2)


def test_question_helpers():
    positions = np.array([[50.0, 32.0], [20.0, 32.0], [32.0, 10.0]])
    right = Scene(("red", "green", "blue"), positions, (0.3, 0.5))  # gripper at x > 32
    left = Scene(("red", "green", "blue"), positions, (math.pi, 0.5))
    assert pointing(right) == "right" and pointing(left) == "left"
    assert nearest_colour(right) == "red" and nearest_colour(left) == "green"


def test_policy_shapes_and_port():
    torch.manual_seed(0)
    policy = LimbPolicy(**TINY)
    out = policy(torch.rand(2, 3, 64, 64), torch.tensor([0, 3]))
    assert out.shape == (2, 4)
    port = policy.port()
    assert isinstance(port, ViTMemoryPort) and port.model_id == "limb-vit"
    assert port.layout.n_layers == 2 and port.layout.n_kv_heads == 3 and port.layout.head_dim == 16


def test_the_policy_imports_its_own_kv_without_change():
    """Parity through the policy's port (q/k-normed blocks, the instruction token): memory = own K/V."""
    from kvmap.stores.tensor import TensorMemory, recording

    torch.manual_seed(0)
    policy = LimbPolicy(**TINY).eval()
    port = policy.port()
    images, target = torch.rand(2, 3, 64, 64), torch.tensor([2, 0])
    with torch.no_grad():
        with recording(port) as kv:
            before = policy(images, target)
        assert kv[0][0].shape == (2, 3, 66, 16)  # (B, H, 1 + 64 + 1 tokens, d)
        with port.importing(TensorMemory(port.layout, "limb-vit", kv)):
            after = policy(images, target)
    assert torch.allclose(before, after, atol=1e-5)


def test_a_few_training_steps_lower_the_loss():
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    module = LimbModule(**TINY, lr=2e-3, warmup_steps=2)
    data = ReachDataModule(train_size=64, val_size=16, test_size=16, batch_size=16)
    batch = next(iter(data.train_dataloader()))

    def loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(module(batch["image"], batch["target"]), batch["angles"]).item()

    before = loss()
    trainer = pl.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert loss() < before
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    assert {"test/loss", "test/reach_acc", "test/reach_px"} <= metrics.keys()


def test_checkpoint_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    policy = LimbPolicy(**TINY).eval()
    path = save_limb(policy, tmp_path / "sub" / "limb.ckpt", {"test/reach_acc": 0.5})
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    loaded = load_limb(path)
    images, target = torch.rand(2, 3, 64, 64), torch.tensor([1, 0])
    with torch.no_grad():
        assert torch.equal(policy(images, target), loaded(images, target))
    assert loaded.config == policy.config


def test_missing_or_foreign_checkpoints_say_what_to_do(tmp_path: Path):
    with pytest.raises(InputError, match="kvmap limb train") as err:
        load_limb(tmp_path / "nope.ckpt")
    assert "\n" not in str(err.value)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a limb policy"):
        load_limb(tmp_path / "junk.ckpt")


def test_the_yaml_config_builds_the_training():
    import yaml
    from importlib import import_module

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "limb.yaml").read_text())

    def build(section: dict):
        module, name = section["class_path"].rsplit(".", 1)
        return getattr(import_module(module), name)(**section.get("init_args", {}))

    assert isinstance(build(config["model"]), LimbModule)
    assert isinstance(build(config["data"]), ReachDataModule)
    import lightning.pytorch as pl

    trainer_args = dict(config["trainer"])
    trainer_args["logger"] = build(trainer_args["logger"])
    trainer_args["callbacks"] = [build(c) for c in trainer_args["callbacks"]]
    pl.Trainer(**trainer_args)
