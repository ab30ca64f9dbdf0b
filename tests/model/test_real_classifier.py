"""The independent real-image classifier behind class consistency: trained once per data version,
cached as a plain state dict, and as accurate on the holdout as it says."""

from __future__ import annotations

import pytest
import torch

from genloop.core.config import load_params
from genloop.core.dataset import load_split
from genloop.core.errors import GenloopError
from genloop.core.workspace import Workspace
from genloop.eval.real_classifier import class_consistency, real_classifier
from genloop.stages import clean, collect

SETTINGS = ["collect.sources=[{uri: 'builtin:mnist', limit: 400}]", "collect.dvc_add=false",
            "data.holdout_fraction=0.25", "evaluate.classifier_epochs=4"]


def test_real_classifier_is_cached_and_judges_real_digits_as_their_class(tmp_path):
    ws = Workspace.at(tmp_path)
    cfg = load_params(None, SETTINGS)
    collect.run(cfg, ws)
    clean.run(cfg, ws)
    clf = real_classifier(cfg, ws)
    assert clf is not None and clf.path.parent == ws.judge_cache / "classifiers"
    holdout = load_split(ws, "holdout", classes=clf.classes)
    # real holdout digits "asked for" their true class: consistency is the classifier's own accuracy
    out = class_consistency(clf.logits(holdout.images), holdout.labels)
    assert out["class_consistency"] == pytest.approx(clf.holdout_accuracy)
    assert out["class_consistency_n"] == len(holdout)
    assert clf.holdout_accuracy > 0.5  # 10 classes: chance is 0.1
    stamp = clf.path.stat().st_mtime_ns
    again = real_classifier(cfg, ws)
    assert again is not None and clf.path.stat().st_mtime_ns == stamp  # loaded, not retrained
    assert torch.equal(again.logits(holdout.images[:8]), clf.logits(holdout.images[:8]))
    clf.path.write_bytes(b"not a state dict")
    with pytest.raises(GenloopError, match="real-image classifier weights"):
        real_classifier(cfg, ws)
