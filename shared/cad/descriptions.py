"""Facts parsed back out of a construction description (the text ``services.convert.describe`` writes), so
that generated descriptions can be scored field by field against the truth, not only as text.

Parsed: the number of extrusions ("built from N extrusion(s)"), the sketch shape kinds in order, the operation
of each extrusion (new body, join, cut, intersect) and the overall size (X, Y, Z). A field the text does not
state (a generated text cut short) is None; ``tests/test_captioning.py`` checks that every description the
converter writes parses back to the facts of its CAD model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
_COUNT = re.compile(r"built from (\d+) extrusions?\b")
_SIZE = re.compile(rf"overall size is {_NUMBER} × {_NUMBER} × {_NUMBER}")
# The outer profile of each sketch follows "sketch a/an"; holes follow "with".
_SHAPE = re.compile(r"sketch an? (regular \w+|\d+-sided polygon|rounded rectangle|closed outline|circle|square|"
                    r"rectangle|triangle|slot|\w+)")
_OPERATIONS = {"as a new body": "new", "and join it to the body": "join", "and cut it from the body": "cut",
               "and keep only its intersection with the body": "intersect"}
_OPERATION = re.compile("|".join(re.escape(p) for p in _OPERATIONS))
_KINDS = {"circle": "circle", "square": "square", "rectangle": "rectangle", "triangle": "triangle",
          "slot": "slot", "rounded rectangle": "rounded rectangle", "closed outline": "outline"}


@dataclass(frozen=True)
class DescriptionFacts:
    extrusions: int | None
    shapes: tuple[str, ...]  # the outer shape kind of each sketched profile, in order
    operations: tuple[str, ...]  # one per extrusion: new / join / cut / intersect
    size: tuple[float, float, float] | None


def _kind(phrase: str) -> str:
    if phrase.startswith("regular ") or phrase.endswith("-sided polygon"):
        return "polygon"
    return _KINDS.get(phrase, phrase)


def parse_description(text: str) -> DescriptionFacts:
    count = _COUNT.search(text)
    size = _SIZE.search(text)
    return DescriptionFacts(
        extrusions=int(count.group(1)) if count else None,
        shapes=tuple(_kind(m.group(1)) for m in _SHAPE.finditer(text)),
        operations=tuple(_OPERATIONS[m.group(0)] for m in _OPERATION.finditer(text)),
        size=tuple(float(size.group(i)) for i in (1, 2, 3)) if size else None,
    )


def size_within(predicted: tuple[float, ...] | None, truth: tuple[float, ...] | None, tolerance: float = 0.1) -> bool:
    """Every side of the predicted overall size within ``tolerance`` (relative) of the true one."""
    if predicted is None or truth is None:
        return False
    return all(abs(p - t) <= tolerance * abs(t) for p, t in zip(predicted, truth, strict=True))
