"""The MLflow pyfunc model of a genloop generator, logged as "models from code".

MLflow runs this file when the model is loaded, so no Python object is ever unpickled:
the weights are a state dict read with `torch.load(weights_only=True)`.

Input: a DataFrame with columns `n` (images) and `seed`, and optionally `label`; one
row per request. Output: uint8 images, N x H x W x C, the rows' images concatenated.

`predict`'s input is typed `pd.DataFrame`: MLflow then neither warns that the type hints are
missing nor tries to infer a schema from them (the logged signature, built from the model's
spec, is the schema). Any other hint (`Any`, `list[...]`) makes MLflow warn or validate.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext


class GeneratorModel(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        from genloop.models import load_generator

        self.generator, self.spec = load_generator(context.artifacts["weights"])

    def predict(
        self, context: PythonModelContext | None, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        from genloop.models import sample

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "n" not in frame.columns:
            raise ValueError("input needs columns n (number of images) and seed")
        out = []
        for row in frame.to_dict("records"):
            label = row.get("label")
            label = None if label is None or (isinstance(label, float) and np.isnan(label)) else label
            out.append(sample(self.generator, self.spec, int(row["n"]), int(row.get("seed", 0)), label))
        return np.concatenate(out)


mlflow.models.set_model(GeneratorModel())
