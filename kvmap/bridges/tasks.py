"""The three bridged tasks, as reproducible examples from a seed.

- ``vision-text``: the limb model sees a scene; the LLM answers a question about it from the
  imported vision memory alone ("What colour is the object nearest the gripper?").
- ``text-limb``: the LLM reads an instruction ("Touch the red ball."); the limb model, given no
  target, must reach the named object from the imported text memory.
- ``text-text``: SmolLM2 reads one or three facts; Gemma 3 answers a question on one of them from
  the imported memory.

Every example carries what its baselines need (the oracle's words, the direct target).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kvmap import arm
from kvmap.arm import COLOURS
from kvmap.errors import InputError

TASKS = ("vision-text", "text-limb", "text-text")


@dataclass
class BridgeExample:
    """One example of a bridged task; fields a task does not use stay empty."""

    source_text: str = ""
    """text-limb / text-text: what the source LLM reads (the instruction or the fact)."""
    image: torch.Tensor | None = None
    """vision-text / text-limb: the rendered scene, (3, 64, 64) in [0, 1]."""
    question: str = ""
    """vision-text / text-text: the question the target LLM answers, with its choices."""
    choices: tuple[str, ...] = ()
    """Candidate answers; the target LLM's answer is the choice whose first token it scores highest."""
    answer: int = -1
    """Index of the right choice."""
    oracle_text: str = ""
    """What the oracle puts in the prompt: the scene described in words, or the fact itself."""
    target: int = 0
    """text-limb: colour id of the object to reach (1..4; 0 = none), the direct baseline's input."""
    angles: torch.Tensor | None = None
    """text-limb: (4,) sin/cos of the joint angles that reach the target (the training label)."""
    goal: torch.Tensor | None = None
    """text-limb: (2,) pixel position of the target object (reach accuracy is measured to it)."""
    kind: str = ""
    """Question or instruction family, for per-family breakdowns."""
    extra: dict = field(default_factory=dict)


def _choices_line(choices) -> str:
    return "Answer with one word: " + ", ".join(choices[:-1]) + " or " + choices[-1] + "."


def _where(xy, size: int = 64) -> str:
    x, y = float(xy[0]), float(xy[1])
    col = "left" if x < size / 3 else "right" if x > 2 * size / 3 else "middle"
    row = "top" if y < size / 3 else "bottom" if y > 2 * size / 3 else "middle"
    return f"at the {row} {col} (x={x:.0f}, y={y:.0f})"


def describe_scene(scene) -> str:
    """The scene in words (the vision-text oracle): gripper and objects with positions, y growing downwards."""
    parts = [f"The arm's base is at the centre (x=32, y=32). The gripper is {_where(scene.gripper)}."]
    for colour, xy in zip(scene.colours, scene.positions):
        parts.append(f"The {colour} ball is {_where(xy)}.")
    return " ".join(parts)


def vision_text_examples(n: int, seed: int) -> list[BridgeExample]:
    """Scenes with a question each: the colour nearest the gripper, or which way the arm points."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = arm.random_scene(rng)
        if i % 2 == 0:
            choices, right = COLOURS, arm.nearest_colour(scene)
            question, kind = "What colour is the object nearest the gripper?", "nearest"
        else:
            choices, right = ("left", "right"), arm.pointing(scene)
            question, kind = "Is the arm pointing left or right?", "pointing"
        out.append(BridgeExample(image=arm.render(scene), question=f"{question} {_choices_line(choices)}",
                                 choices=choices, answer=choices.index(right), oracle_text=describe_scene(scene),
                                 kind=kind))
    return out


INSTRUCTIONS = ("Touch the {c} ball.", "Reach for the {c} object.", "Move the gripper to the {c} ball.",
                "Go to the {c} one.")


def text_limb_examples(n: int, seed: int) -> list[BridgeExample]:
    """Scenes with an instruction naming one of their objects; the label is the reaching pose."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = arm.random_scene(rng)
        pick = int(rng.integers(len(scene.colours)))
        colour = scene.colours[pick]
        goal_xy = np.asarray(scene.positions[pick], dtype=np.float32)
        goal = torch.from_numpy(goal_xy)
        theta = arm.reach_angles(goal_xy)
        angles = torch.from_numpy(arm.angle_features(theta)).float()
        template = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        out.append(BridgeExample(source_text=template.format(c=colour), image=arm.render(scene),
                                 target=COLOURS.index(colour) + 1, angles=angles, goal=goal,
                                 kind=template.split()[0].lower()))
    return out


THINGS = ("box", "cup", "hat", "door", "kite", "boat", "coat", "bag")
NAMES = ("Anna", "Ben", "Clara", "David", "Ella", "Felix", "Greta", "Hans", "Ida", "Jonas")


def text_text_examples(n: int, seed: int) -> list[BridgeExample]:
    """Facts ("Anna's kite is blue.") for the source; the target is asked one fact's colour.

    Even examples hold one fact (``single``: the colour word alone answers it); odd ones hold three
    facts about different people and things with different colours (``three-facts``: the answer
    must be bound to the right person and thing, not just copied).
    """
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        n_facts = 1 if i % 2 == 0 else 3
        names = rng.choice(len(NAMES), n_facts, replace=False)
        things = rng.choice(len(THINGS), n_facts, replace=False)
        colours = rng.choice(len(COLOURS), n_facts, replace=False)
        facts = [f"{NAMES[a]}'s {THINGS[b]} is {COLOURS[c]}." for a, b, c in zip(names, things, colours)]
        asked = int(rng.integers(n_facts))
        name, thing = NAMES[names[asked]], THINGS[things[asked]]
        text = " ".join(facts)
        out.append(BridgeExample(source_text=text, question=f"What colour is {name}'s {thing}? {_choices_line(COLOURS)}",
                                 choices=COLOURS, answer=int(colours[asked]), oracle_text=text,
                                 kind="single" if n_facts == 1 else "three-facts"))
    return out


def make_examples(task: str, n: int, seed: int) -> list[BridgeExample]:
    """``n`` examples of ``task`` (one of :data:`TASKS`), the same for the same seed."""
    makers = {"vision-text": vision_text_examples, "text-limb": text_limb_examples, "text-text": text_text_examples}
    if task not in makers:
        raise InputError(f"unknown bridge task '{task}'; choose one of {', '.join(TASKS)}")
    return makers[task](n, seed)
