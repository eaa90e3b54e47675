"""Label Studio labeling config -> what the backend predicts, per control.

Every BrushLabels / PolygonLabels control tied to an Image is predicted. Each of its labels
(named by alias-or-value, as LabelInterface lists them and Label Studio stores them in results)
is a class, whose text query is its `value`, the name annotators read (an alias is often a code
for export: "A" for "Airplane"); `predicted_values="cat, kitten"` gives the text queries
(synonyms) instead; `model_skip="true"` leaves a label out. Control
attributes: `model_score_threshold` (pixels below stay unlabeled) and `model_background="sky,
wall"` (extra queries whose pixels stay unlabeled). A label with an empty name is skipped
with a warning.

The config comes from whoever can reach the backend: it is parsed first with defusedxml,
which refuses DTDs and entities (XXE, entity expansion), whatever lxml's defaults are.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Tuple

import defusedxml.ElementTree
from defusedxml import DefusedXmlException
from label_studio_sdk.label_interface import LabelInterface

from rfclip_engine.text import Vocabulary

log = logging.getLogger("rfclip.backend")
REGION_TYPES = {"BrushLabels": "brushlabels", "PolygonLabels": "polygonlabels"}
EXAMPLE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="cat" predicted_values="cat, kitten"/>
    <Label value="dog"/>
  </BrushLabels>
</View>"""


class LabelConfigError(ValueError):
    """The labeling config gives the backend nothing it can predict."""


@dataclass(frozen=True)
class ControlTarget:
    """One control to predict: its labels, their queries, and where its regions go."""

    from_name: str
    to_name: str
    region_type: str  # "brushlabels" or "polygonlabels"
    data_key: str  # task["data"] key of the image
    labels: Tuple[str, ...]
    queries: Tuple[Tuple[str, ...], ...]  # per label
    background: Tuple[str, ...]
    score_threshold: float

    @property
    def vocabulary(self) -> Vocabulary:
        """The labels' classes, then one class holding all background queries (if any)."""
        classes = self.queries + ((self.background,) if self.background else ())
        return Vocabulary(classes)


def _split(text: str) -> Tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _threshold(raw: str, control: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise LabelConfigError(f'control "{control}": model_score_threshold="{raw}" is not a number') from None
    if not 0.0 <= value <= 1.0:
        raise LabelConfigError(f'control "{control}": model_score_threshold must be between 0 and 1, got {value}')
    return value


def parse_label_config(config: str) -> List[ControlTarget]:
    """The controls of a labeling config that the backend can predict.

    Raises LabelConfigError, with an example of a usable config, when there is none.
    """
    return read_label_config(config)[0]


def read_label_config(config: str) -> Tuple[List[ControlTarget], LabelInterface]:
    """The predictable controls and the SDK's interface of the config (for validating regions)."""
    if not config or not config.strip():
        raise LabelConfigError(f"the labeling config is empty; the backend needs one like:\n{EXAMPLE_CONFIG}")
    try:
        defusedxml.ElementTree.fromstring(config, forbid_dtd=True)
    except DefusedXmlException as err:
        raise LabelConfigError(f"the labeling config declares a DTD or entities, which are not accepted ({err})") from None
    except Exception as err:
        raise LabelConfigError(f"the labeling config is not valid XML ({err}); expected e.g.:\n{EXAMPLE_CONFIG}") from None
    try:
        interface = LabelInterface(config)
    except Exception as err:
        raise LabelConfigError(f"the labeling config is not valid XML ({err}); expected e.g.:\n{EXAMPLE_CONFIG}") from err

    targets, image_lists = [], set()
    for control in interface.controls or ():
        region_type = REGION_TYPES.get(control.tag)
        if region_type is None:
            continue
        for to_name in control.to_name:
            try:
                obj = interface.get_object(to_name)
            except Exception:
                continue
            if obj.tag != "Image" or not str(obj.value).startswith("$"):
                continue
            if "valueList" in obj.attr:  # the SDK reads it as the value: each task would fail at its fetch
                image_lists.add(to_name)
                continue
            labels, queries = [], []
            for label, tag in control.labels_attrs.items():
                if str(tag.attr.get("model_skip", "")).lower() == "true":
                    continue
                if not str(label).strip():
                    log.warning('control "%s": a <Label> with an empty value is skipped', control.name)
                    continue
                labels.append(label)
                name = str(tag.attr.get("value") or label).strip()
                queries.append(_split(tag.attr.get("predicted_values", "")) or (name,))
            if not labels:
                continue
            attrs = control.attr
            targets.append(ControlTarget(
                from_name=control.name,
                to_name=to_name,
                region_type=region_type,
                data_key=str(obj.value)[1:],
                labels=tuple(labels),
                queries=tuple(queries),
                background=_split(attrs.get("model_background", "")),
                score_threshold=_threshold(attrs["model_score_threshold"], control.name)
                if "model_score_threshold" in attrs else 0.0,
            ))
    for name in sorted(image_lists) if targets else ():
        log.warning('<Image name="%s"> takes a list of images (valueList): its controls are not pre-annotated, '
                    'only those of an <Image value="$...">, one image per task', name)
    if not targets and image_lists:
        raise LabelConfigError(
            f'<Image name="{sorted(image_lists)[0]}"> takes a list of images (valueList), which the backend does '
            f'not pre-annotate: it predicts one image per task, <Image value="$...">. A config it can use:\n'
            f"{EXAMPLE_CONFIG}")
    if not targets:
        raise LabelConfigError(
            "the labeling config has no BrushLabels or PolygonLabels control with labels tied to an "
            f"<Image value=\"$...\"> tag, so there is nothing to pre-annotate. A config the backend can use:\n"
            f"{EXAMPLE_CONFIG}")
    return targets, interface


def targets_by_image(targets: List[ControlTarget]) -> Dict[str, List[ControlTarget]]:
    """Controls grouped by the task data key of their image (one fetch and encoding per image)."""
    grouped: Dict[str, List[ControlTarget]] = {}
    for target in targets:
        grouped.setdefault(target.data_key, []).append(target)
    return grouped
