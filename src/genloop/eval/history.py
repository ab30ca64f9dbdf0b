"""reports/eval_history.csv: one row per evaluation, the loop's curves across iterations.

Beside the quality metrics it keeps the diversity judges (recall, coverage) and what the loop
feeds back into itself: the synthetic share of the clean corpus (accepted generations, source
`feedback:`) and how far the class mix of those accepted images is from the corpus's (total
variation distance). A loop that trains on its own output can narrow from one iteration to
the next; these columns, and reports/eval_history.png, show it happening.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from genloop.core.storage import atomic_path
from genloop.core.workspace import Workspace

FEEDBACK_SOURCE = "feedback:"
HISTORY_METRICS = ("fid", "kid_mean", "c2st_auc", "inception_score", "precision", "recall", "coverage",
                   "class_consistency", "memorised_share", "synthetic_share", "feedback_class_tv")
HISTORY_COLUMNS = ["iteration", "time", "data_version", "generator", "extractor", *HISTORY_METRICS]


def corpus_mix(ws: Workspace) -> dict[str, float | None]:
    """The synthetic share of the clean corpus, and the total variation distance between the class
    mix of its accepted generations and the whole corpus's (None without labels or feedback)."""
    manifest = pd.read_parquet(ws.manifest, columns=["source", "label"])
    synthetic = manifest["source"].astype(str).str.startswith(FEEDBACK_SOURCE)
    tv = None
    if synthetic.any() and manifest["label"].notna().all():
        corpus = manifest["label"].astype(str).value_counts(normalize=True)
        accepted = manifest.loc[synthetic, "label"].astype(str).value_counts(normalize=True)
        tv = float(0.5 * accepted.reindex(corpus.index, fill_value=0.0).sub(corpus).abs().sum())
    return {"synthetic_share": float(synthetic.mean()), "feedback_class_tv": tv}


def append(ws: Workspace, row: dict[str, Any]) -> pd.DataFrame:
    """Add this evaluation to reports/eval_history.csv (replacing a re-evaluation of the same
    generator on the same data) and return the whole history."""
    path = ws.reports / "eval_history.csv"
    history = pd.read_csv(path, dtype={"generator": str}) if path.exists() else pd.DataFrame(columns=HISTORY_COLUMNS)
    same = (history["generator"] == row["generator"]) & (history["data_version"] == row["data_version"])
    history = history[~same]
    row["iteration"] = int(history["iteration"].max()) + 1 if len(history) else 0
    new = pd.DataFrame([row], columns=HISTORY_COLUMNS)
    history = pd.concat([history, new], ignore_index=True) if len(history) else new
    with atomic_path(path) as tmp:
        history.to_csv(tmp, index=False)
    return history


def plot(history: pd.DataFrame, path: Path) -> None:
    """Diversity per iteration beside the synthetic share and the feedback's class-mix distance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3))
    for name in ("recall", "coverage"):
        if name in history and history[name].notna().any():
            left.plot(history["iteration"], history[name], marker="o", label=name)
    left.set(title="diversity (higher is better)", xlabel="loop iteration", ylim=(0, 1.05))
    for name in ("synthetic_share", "feedback_class_tv"):
        if name in history and history[name].notna().any():
            right.plot(history["iteration"], history[name], marker="s", label=name)
    right.set(title="what the loop feeds itself", xlabel="loop iteration", ylim=(0, 1.05))
    for ax in (left, right):
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
