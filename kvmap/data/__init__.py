"""Data shipped with kvmap (public-domain tales, prompt templates); each folder keeps its SOURCE.txt."""
from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path


def data_path(*parts: str) -> Path:
    """Path of a file shipped in ``kvmap/data``."""
    return Path(str(files("kvmap.data").joinpath(*parts)))


def grimm_tales() -> list[dict]:
    """Grimm's Household Tales (Hunt, 1884): dicts with id, number, title, text, n_words."""
    with open(data_path("tales", "grimm_hunt", "grimm_hunt_tales.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def passkey_template() -> dict:
    """The Landmark-Attention passkey prompt strings (see templates/passkey_niah/SOURCE.txt)."""
    with open(data_path("templates", "passkey_niah", "templates.json"), encoding="utf-8") as f:
        return json.load(f)["landmark_attention_passkey"]
