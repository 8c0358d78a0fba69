"""``curves.png``: loss, learning rate and validation Dice over training, from ``metrics.csv``."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            series[row["name"]].append((int(row["step"]), float(row["value"])))
    return dict(series)


def write_curves(metrics_csv: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(metrics_csv)
    panels = [
        ("loss", ["loss"]),
        ("learning rate", ["lr"]),
        ("validation Dice (KiTS19)", ["kidney_dice", "tumor_dice", "mean_dice"]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, names) in zip(axes, panels, strict=True):
        for name in names:
            if name in series:
                steps, values = zip(*series[name], strict=True)
                ax.plot(steps, values, marker="o" if "dice" in name else None, markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(names) > 1:
            ax.set_ylim(0, 1)
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    temporary = png.with_name(f".{png.name}.partial.png")
    fig.savefig(temporary, dpi=90)
    plt.close(fig)
    temporary.replace(png)
