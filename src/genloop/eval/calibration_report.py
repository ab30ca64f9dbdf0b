"""The calibration ladder for people: reports/calibration.json, .csv (dvc plots), a plot and a
sheet of the rungs, and the same in the MLflow run; plus the sentences that place a metric
value on the ladder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from genloop.core.grids import make_grid
from genloop.core.storage import atomic_path, write_json_atomic
from genloop.eval import degrade
from genloop.eval.calibration import Calibration, table
from genloop.mlops import tracking

PLOTTED = ("fid", "c2st_auc", "kid_mean", "recall", "coverage", "curation_score")


def positions(cal: Calibration, metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every calibrated metric of an evaluation placed on every ladder."""
    return {m: cal.position(m, float(v)) for m, v in metrics.items()
            if m in cal.floor and isinstance(v, int | float) and not isinstance(v, bool)}


def readable(cal: Calibration, metrics: dict[str, Any], gate_metric: str, judged: int | None = None) -> list[str]:
    """The sentences a person reads first: the gate metric and the C2ST on the blur ladder, the
    diversity judges on the mode-drop ladder. `judged`: the values judge only the first `judged`
    samples (the ladder's size; `calibration.at_ladder_size`), which each sentence then says."""
    lines = []
    for m in dict.fromkeys((gate_metric, "fid", "c2st_auc")):
        if m in cal.floor and metrics.get(m) is not None:
            lines.append(cal.headline(m, float(metrics[m])))
    for m in ("recall", "coverage"):
        if m in cal.floor and metrics.get(m) is not None:
            place = cal.position(m, float(metrics[m]))["mode_drop"]["text"]
            lines.append(f"{m} {float(metrics[m]):.3g} {place}")
    return lines if judged is None else [f"{line} (on the first {judged:,} samples, the ladder's size)"
                                         for line in lines]


def plot(cal: Calibration, path: Path) -> None:
    """One panel per judge: its value along each ladder (rung 0 = real), the noise as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in PLOTTED if m in cal.floor]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for ladder, rungs in cal.ladders.items():
            ax.plot(range(len(rungs) + 1), [cal.floor[m]] + [r["values"][m] for r in rungs], marker="o", label=ladder)
        ax.axhspan(cal.floor[m] - cal.noise[m], cal.floor[m] + cal.noise[m], color="grey", alpha=0.2)
        ax.set_title(m + (" (flagged)" if cal.flags.get(m) else ""), fontsize=9)
        ax.set_xlabel("rung (0 = real)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"calibration ladder, {cal.extractor} features, {cal.n} real images", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def rung_sheet(images: torch.Tensor, per_rung: int = 6, seed: int = 0) -> Image.Image:
    """What the ladder's rungs look like: one row per rung (the first row is real)."""
    real = images[:per_rung]
    rows = [real]
    for ladder, levels in degrade.ladders_for(images.shape[1]).items():
        if ladder != "mode_drop":  # repeats of real images look real: nothing to see
            rows += [degrade.apply(real, ladder, level, seed) for level in levels]
    tiles = torch.cat(rows).permute(0, 2, 3, 1).numpy()
    return make_grid(np.ascontiguousarray(tiles), columns=per_rung, scale=2)


def write(cal: Calibration, gate: tuple[str, str], reports: Path, train_images: torch.Tensor) -> dict[str, Any]:
    """reports/calibration.{json,csv,png} and calibration_rungs.png; returns the summary for eval.json."""
    body = cal.as_dict() | {"gate_metric": {"name": gate[0], "why": gate[1]}}
    write_json_atomic(reports / "calibration.json", body)
    with atomic_path(reports / "calibration.csv") as tmp:
        pd.DataFrame(table(cal)).to_csv(tmp, index=False)
    plot(cal, reports / "calibration.png")
    with atomic_path(reports / "calibration_rungs.png") as tmp:
        rung_sheet(train_images).save(tmp, format="PNG")
    return {"key": cal.key, "n_real": cal.n, "seconds": cal.seconds, "flags": cal.flags,
            "noise": cal.noise, "memorisation_check": cal.memorisation, "report": "reports/calibration.json"}


def log(cal: Calibration, reports: Path) -> None:
    """The ladder in the current MLflow run: a table, the plot and the rung sheet."""
    tracking.log_table(pd.DataFrame(table(cal)), "calibration/ladder.json")
    tracking.log_artifact(reports / "calibration.png", "calibration")
    tracking.log_artifact(reports / "calibration_rungs.png", "calibration")
    tracking.log_artifact(reports / "calibration.json", "calibration")
