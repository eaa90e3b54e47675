"""Distraction-dimension presets, kept as data in `presets.json` and keyed by (architecture,
weights tag), plus the calibration file format that carries them for any other backbone."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Dict, Optional, Tuple, Union


@dataclass(frozen=True)
class DistractionPreset:
    """Where a backbone over-activates, and whether its distraction test also asks for attention."""

    dims: Tuple[int, ...]
    attention_test: bool = False

    def to_json(self) -> dict:
        return {"distraction_dims": list(self.dims), "attention_test": self.attention_test}

    @classmethod
    def from_json(cls, data: object) -> "DistractionPreset":
        dims = data.get("distraction_dims") if isinstance(data, dict) else None
        if not isinstance(dims, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            raise ValueError("a distraction preset needs a 'distraction_dims' list of channel indices")
        return cls(tuple(dims), bool(data.get("attention_test", False)))


def architecture_key(model_name: str) -> str:
    """The architecture a model name stands for: "ViT-B-16-quickgelu" and "ViT-B/16" are ViT-B-16."""
    name = model_name.replace("/", "-")
    return name[: -len("-quickgelu")] if name.endswith("-quickgelu") else name


def _builtin() -> Dict[str, Dict[str, dict]]:
    return json.loads(resources.files(__package__).joinpath("presets.json").read_text())


def find_preset(model_name: str, weights_tag: Optional[str]) -> Optional[DistractionPreset]:
    """The shipped preset for these weights, or None when the backbone needs calibration."""
    if weights_tag is None:
        return None
    entry = _builtin().get(architecture_key(model_name), {}).get(weights_tag)
    return DistractionPreset.from_json(entry) if entry else None


def load_preset_file(path: Union[str, Path]) -> DistractionPreset:
    """Read a file written by `rfclip calibrate` (or by hand: {"distraction_dims": [...]})."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read distraction dimensions from {path}: {err}") from err
    try:
        return DistractionPreset.from_json(data)
    except ValueError as err:
        raise ValueError(f"{path} does not hold distraction dimensions: expected "
                         f'{{"distraction_dims": [channel, ...]}}, as `rfclip calibrate` writes ({err})') from None


def save_preset_file(path: Union[str, Path], preset: DistractionPreset, **metadata: object) -> None:
    Path(path).write_text(json.dumps({**metadata, **preset.to_json()}, indent=2) + "\n")
