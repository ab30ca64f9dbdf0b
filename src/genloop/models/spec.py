"""What a generator is: the spec saved as JSON beside its weights, enough to rebuild it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GeneratorSpec:
    """What a generator is: its family, image shape, classes and hyper-parameters."""

    family: str
    resolution: int
    channels: int
    classes: list[str] = field(default_factory=list)  # empty: unconditional
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=2)

    @classmethod
    def from_json(cls, text: str) -> GeneratorSpec:
        return cls(**json.loads(text))
