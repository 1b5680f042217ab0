"""A synthetic 2-link arm world: scenes, kinematics, rendering and the reach dataset.

The limb-control policy that acts in it is :class:`kvmap.models.limb.LimbPolicy`; the bridge tasks
(:mod:`kvmap.bridges.tasks`) ask questions about its scenes.

The world is a 64x64 RGB image, black background, seen from above: an arm whose base sits at the
image centre (two grey links, a white gripper dot at the end effector) and three coloured discs.
The task: given the image and an instruction (a colour, or none), output the joint angles that put
the gripper on the disc of that colour (no instruction: keep the arm where it is).

Coordinates are image pixels: x to the right, y down, pixel (row r, column c) centred at
(c + 0.5, r + 0.5). Joint angles are radians measured from the +x axis towards +y; the elbow angle
``theta2`` is relative to the first link and kept in [0, pi] (one consistent elbow solution).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

COLOURS = ("red", "green", "blue", "yellow")
"""Object colours; an instruction or target id is ``COLOURS.index(name) + 1`` (0 = none)."""
RGB = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.2, 0.3, 1.0), "yellow": (1.0, 0.9, 0.1)}
SIZE = 64
"""Image side in pixels."""
BASE = (32.0, 32.0)
"""Arm base (x, y): the image centre."""
LINKS = (14.0, 12.0)
"""Link lengths l1, l2 in pixels: the gripper reaches radii |l1 - l2| = 2 to l1 + l2 = 26."""
OBJECT_RADIUS = 4.0
OBJECT_RING = (8.0, 23.0)
"""Objects' centres lie at these distances from the base: reachable, off the base, inside the image."""
ARM_HALF_WIDTH = 1.5
GRIPPER_RADIUS = 2.0
ARM_GREY = 0.5
REACH_TOLERANCE = 4.0
"""A reach succeeds when the gripper lands within this many pixels of the target's centre."""


@dataclass(frozen=True)
class Scene:
    """One world state and one instruction."""

    colours: tuple[str, ...]
    """Colour names of the objects (distinct, from :data:`COLOURS`)."""
    positions: np.ndarray
    """(n_objects, 2) object centres (x, y) in pixels."""
    angles: tuple[float, float]
    """Current joint angles (theta1, theta2) of the arm, radians."""
    target: str | None = None
    """Colour the policy is asked to reach; ``None``: no instruction (keep the arm where it is)."""

    @cached_property
    def gripper(self) -> np.ndarray:
        """(2,) end-effector position (x, y) in pixels."""
        return forward_kinematics(np.asarray(self.angles))

    @property
    def target_id(self) -> int:
        """Instruction id: 1..4 for :data:`COLOURS`, 0 for none."""
        return 0 if self.target is None else COLOURS.index(self.target) + 1

    @property
    def target_xy(self) -> np.ndarray:
        """(2,) where the gripper should go: the target object's centre, or the gripper itself."""
        if self.target is None:
            return self.gripper
        return self.positions[self.colours.index(self.target)]


def forward_kinematics(angles):
    """End-effector position of joint angles.

    Parameters
    ----------
    angles : (..., 2) theta1, theta2 in radians (numpy array or tensor).

    Returns
    -------
    (..., 2) gripper (x, y) in pixels, same array type as ``angles``.
    """
    xp = torch if isinstance(angles, torch.Tensor) else np
    t1, t2 = angles[..., 0], angles[..., 1]
    x = BASE[0] + LINKS[0] * xp.cos(t1) + LINKS[1] * xp.cos(t1 + t2)
    y = BASE[1] + LINKS[0] * xp.sin(t1) + LINKS[1] * xp.sin(t1 + t2)
    return xp.stack([x, y], -1)


def reach_angles(target) -> np.ndarray:
    """Analytic 2-link inverse kinematics with the elbow angle in [0, pi].

    Parameters
    ----------
    target : a :class:`Scene` (its ``target_xy``) or (..., 2) target points (x, y) in pixels.
        Points out of reach are reached as far as the arm goes along their direction.

    Returns
    -------
    (..., 2) joint angles (theta1, theta2) in radians.
    """
    xy = target.target_xy if isinstance(target, Scene) else np.asarray(target, dtype=np.float64)
    dx, dy = xy[..., 0] - BASE[0], xy[..., 1] - BASE[1]
    l1, l2 = LINKS
    cos2 = (dx**2 + dy**2 - l1**2 - l2**2) / (2 * l1 * l2)
    t2 = np.arccos(np.clip(cos2, -1.0, 1.0))
    t1 = np.arctan2(dy, dx) - np.arctan2(l2 * np.sin(t2), l1 + l2 * np.cos(t2))
    t1 = (t1 + np.pi) % (2 * np.pi) - np.pi  # wrap to [-pi, pi)
    return np.stack([t1, t2], -1)


def angle_features(angles) -> np.ndarray:
    """(..., 2) joint angles -> (..., 4) (sin t1, cos t1, sin t2, cos t2): what the policy predicts."""
    angles = np.asarray(angles, dtype=np.float64)
    return np.stack([np.sin(angles[..., 0]), np.cos(angles[..., 0]), np.sin(angles[..., 1]), np.cos(angles[..., 1])], -1)


def features_to_angles(features: torch.Tensor) -> torch.Tensor:
    """(..., 4) (sin t1, cos t1, sin t2, cos t2), not necessarily normalised -> (..., 2) angles."""
    return torch.stack([torch.atan2(features[..., 0], features[..., 1]),
                        torch.atan2(features[..., 2], features[..., 3])], -1)


def random_scene(rng: np.random.Generator, n_objects: int = 3, p_none: float = 0.2) -> Scene:
    """Draw a scene: ``n_objects`` non-overlapping discs of distinct colours, an arm pose, an instruction.

    Parameters
    ----------
    rng : the only source of randomness (the same generator state gives the same scene).
    n_objects : discs in the scene (at most ``len(COLOURS)``).
    p_none : probability that the instruction is "none" instead of one of the scene's colours.
    """
    colours = tuple(COLOURS[i] for i in rng.permutation(len(COLOURS))[:n_objects])
    lo, hi = OBJECT_RING
    positions: list[np.ndarray] = []
    while len(positions) < n_objects:  # rejection sampling, a few candidates per draw
        u = rng.random((4 * n_objects, 2))
        r = np.sqrt(lo**2 + u[:, 0] * (hi**2 - lo**2))  # uniform over the ring's area
        phi = (2 * u[:, 1] - 1) * np.pi
        for p in np.stack([BASE[0] + r * np.cos(phi), BASE[1] + r * np.sin(phi)], -1):
            if len(positions) < n_objects and all(np.hypot(*(p - q)) >= 2 * OBJECT_RADIUS + 2 for q in positions):
                positions.append(p)
    u = rng.random(4)
    angles = ((2 * u[0] - 1) * math.pi, (0.15 + 0.7 * u[1]) * math.pi)
    target = None if u[2] < p_none else colours[int(u[3] * n_objects)]
    return Scene(colours, np.stack(positions), angles, target)


_PIXELS = torch.arange(SIZE, dtype=torch.float32) + 0.5
_X = _PIXELS.view(1, 1, 1, SIZE)  # pixel-centre x, broadcast as (B, K, rows, cols)
_Y = _PIXELS.view(1, 1, SIZE, 1)  # pixel-centre y


def _disc_cover(centres: torch.Tensor, radius: float) -> torch.Tensor:
    """Coverage in [0, 1] of discs with a one-pixel soft (anti-aliased) edge: (B, K, 2) -> (B, K, S, S)."""
    cx, cy = centres[..., 0, None, None], centres[..., 1, None, None]  # (B, K, 1, 1)
    return (radius + 0.5 - torch.hypot(_X - cx, _Y - cy)).clamp(0.0, 1.0)


def _segment_cover(a: torch.Tensor, b: torch.Tensor, half_width: float) -> torch.Tensor:
    """Coverage in [0, 1] of thick lines from a to b with a soft edge: (B, K, 2) x 2 -> (B, K, S, S)."""
    ax, ay = a[..., 0, None, None], a[..., 1, None, None]  # (B, K, 1, 1)
    dx, dy = (b - a)[..., 0, None, None], (b - a)[..., 1, None, None]
    t = (((_X - ax) * dx + (_Y - ay) * dy) / (dx * dx + dy * dy).clamp_min(1e-9)).clamp(0.0, 1.0)  # (B, K, S, S)
    dist = torch.hypot(_X - (ax + t * dx), _Y - (ay + t * dy))
    return (half_width + 0.5 - dist).clamp(0.0, 1.0)


def _paint(img: torch.Tensor, cover: torch.Tensor, rgb: torch.Tensor) -> None:
    """Blend colours over ``img`` (B, 3, S, S) in place: coverage (B, S, S), colours (B, 3) or (3,)."""
    rgb = rgb.expand(img.shape[0], 3)[:, :, None, None]  # (B, 3, 1, 1)
    img += cover[:, None] * (rgb - img)


def render_batch(scenes: Sequence[Scene]) -> torch.Tensor:
    """Draw scenes at once: arm links, then objects, then the gripper dot on top.

    Returns
    -------
    (B, 3, SIZE, SIZE) float32 images in [0, 1].
    """
    angles = torch.tensor(np.array([s.angles for s in scenes]), dtype=torch.float32)  # (B, 2)
    positions = torch.tensor(np.stack([s.positions for s in scenes]), dtype=torch.float32)  # (B, K, 2)
    colours = torch.tensor([[RGB[c] for c in s.colours] for s in scenes])  # (B, K, 3)
    base = torch.tensor(BASE).expand(len(scenes), 2)  # (B, 2)
    t1 = angles[:, 0]
    elbow = base + LINKS[0] * torch.stack([t1.cos(), t1.sin()], -1)  # (B, 2)
    gripper = forward_kinematics(angles)  # (B, 2)

    img = torch.zeros(len(scenes), 3, SIZE, SIZE)
    links = _segment_cover(torch.stack([base, elbow], 1), torch.stack([elbow, gripper], 1), ARM_HALF_WIDTH)
    _paint(img, links.amax(1), torch.full((3,), ARM_GREY))
    objects = _disc_cover(positions, OBJECT_RADIUS)  # (B, K, S, S); objects never overlap, so
    img *= 1 - objects.sum(1, keepdim=True)  # they are painted at once
    img += torch.einsum("bkhw,bkc->bchw", objects, colours)
    _paint(img, _disc_cover(gripper[:, None], GRIPPER_RADIUS)[:, 0], torch.ones(3))
    return img


def render(scene: Scene) -> torch.Tensor:
    """Draw one scene: (3, SIZE, SIZE) float32 image in [0, 1] (see :func:`render_batch`)."""
    return render_batch([scene])[0]


def nearest_colour(scene: Scene) -> str:
    """Colour of the object nearest the gripper."""
    dist = np.hypot(*(scene.positions - scene.gripper).T)  # (n_objects,)
    return scene.colours[int(dist.argmin())]


def pointing(scene: Scene) -> str:
    """``"left"`` or ``"right"``: which side of the base the gripper is on."""
    return "left" if scene.gripper[0] < BASE[0] else "right"


class ReachDataset(Dataset):
    """``n`` scenes, each drawn from its own generator seeded by (seed, index): deterministic, lazy.

    Each item is a dict of tensors:

    - ``image`` (3, 64, 64) float in [0, 1]; ``target`` () long, 0 = none, 1..4 = :data:`COLOURS`;
    - ``angles`` (4,) sin/cos of the joint angles that reach the target (the regression label);
    - ``target_xy`` (2,) where the gripper should land;
    - for questions about the scene: ``colours`` (n_objects,) long ids, ``positions`` (n_objects, 2),
      ``arm`` (2,) current joint angles, ``gripper`` (2,), ``nearest`` () long colour id of the object
      nearest the gripper, ``pointing`` () long (0 = left, 1 = right), ``index`` () long.
    """

    def __init__(self, n: int, seed: int, p_none: float = 0.2):
        self.n, self.seed, self.p_none = n, seed, p_none

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return random_scene(np.random.default_rng((self.seed, index)), p_none=self.p_none)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Items of several indices, rendered in one vectorised call (the DataLoader uses this)."""
        scenes = [self.scene(int(i)) for i in indices]
        images = render_batch(scenes)  # (B, 3, S, S)
        items = []
        for index, scene, image in zip(indices, scenes, images):
            gripper = scene.gripper
            items.append({
                "image": image,
                "target": torch.tensor(scene.target_id),
                "angles": torch.from_numpy(angle_features(reach_angles(scene))).float(),
                "target_xy": torch.from_numpy(scene.target_xy).float(),
                "colours": torch.tensor([COLOURS.index(c) + 1 for c in scene.colours]),
                "positions": torch.from_numpy(scene.positions).float(),
                "arm": torch.tensor(scene.angles, dtype=torch.float32),
                "gripper": torch.from_numpy(gripper).float(),
                "nearest": torch.tensor(COLOURS.index(nearest_colour(scene)) + 1),
                "pointing": torch.tensor(int(gripper[0] >= BASE[0])),
                "index": torch.tensor(int(index)),
            })
        return items


def reach_error(pred: torch.Tensor, target_xy: torch.Tensor) -> torch.Tensor:
    """Distance in pixels between where predicted angles put the gripper and the target.

    Parameters
    ----------
    pred : (B, 4) predicted (sin t1, cos t1, sin t2, cos t2).
    target_xy : (B, 2) target points (x, y), e.g. a batch's ``target_xy``.

    Returns
    -------
    (B,) pixel distances.
    """
    reached = forward_kinematics(features_to_angles(pred.float()))  # (B, 2)
    return torch.linalg.vector_norm(reached - target_xy.float(), dim=-1)
