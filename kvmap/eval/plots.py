"""Where the report's plots go and how they are drawn: matplotlib without a display, files under one folder."""
from __future__ import annotations

from pathlib import Path

PLOT_DIR = Path("docs") / "plots"
"""The plots' folder, relative to the report's markdown file."""


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_path(out_dir: Path, name: str) -> Path:
    """Where plot ``name`` goes for a report written into ``out_dir`` (the folder is made)."""
    folder = Path(out_dir) / PLOT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def plot_link(out_dir: Path, path: Path) -> str:
    """The markdown link target of ``path`` from a report in ``out_dir``."""
    return Path(path).relative_to(out_dir).as_posix()
