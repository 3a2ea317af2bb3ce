"""Which classes of a model are not animals: the blank (empty trigger), person and vehicle classes, found by their
label. The outputs treat them as the standards do: MegaDetector writes a blank as ``detections: []`` and a person
or vehicle as its categories 2 and 3; Camtrap DP writes them as the observation types blank, human and vehicle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["BLANK", "HUMAN", "VEHICLE", "class_kinds", "kind_of_label"]

BLANK, HUMAN, VEHICLE = "blank", "human", "vehicle"

# label (case-folded) -> kind; the words used by the LILA / Snapshot / scenes label sets
_WORDS = {
    "blank": BLANK, "empty": BLANK, "nothing": BLANK, "background": BLANK,
    "person": HUMAN, "human": HUMAN, "people": HUMAN, "homo sapiens": HUMAN,
    "vehicle": VEHICLE, "car": VEHICLE, "truck": VEHICLE,
}


def kind_of_label(label: str) -> str | None:
    """``blank``, ``human``, ``vehicle`` or None (an animal class)."""
    return _WORDS.get(str(label).strip().casefold())


def class_kinds(labels: Sequence[str] | Mapping[str, str]) -> dict[int, str]:
    """Class index -> kind for the classes that are not animals; ``labels`` is the label list or the results'
    ``classification_categories`` (index string -> name)."""
    items = labels.items() if isinstance(labels, Mapping) else enumerate(labels)
    out = {}
    for i, name in items:
        kind = kind_of_label(name)
        if kind is not None:
            out[int(i)] = kind
    return out
