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


# Image-level facts as class targets (``fact_targets``): what views show of a part, for a captioner's auxiliary
# heads. Each group is one categorical target: the extrusion count (counts above MAX_EXTRUSIONS share the last
# class), the first sketch plane's normal axis, per step (up to MAX_EXTRUSIONS) its operation and its first
# sketched shape ("none" past the last step), and the overall size as the view shows it: the renderer frames all
# views of a part at one scale, its largest side spanning the image less the margins, so a view shows the extents
# along its two visible axes as fractions of that side (SIZE_BINS classes each). The first visible axis in X, Y, Z
# order is the view's horizontal, the second its vertical (front: X and Z; top: X and Y; right: Y and Z); the view
# is read from the prompt ("looking along +Y").
MAX_EXTRUSIONS = 4
SIZE_BINS = 20
SHAPE_KINDS = ("circle", "square", "rectangle", "triangle", "polygon", "slot", "rounded rectangle", "outline")
OPERATION_KINDS = ("new", "join", "cut", "intersect")
PLANE_AXES = ("X", "Y", "Z", "inclined")
FACT_GROUPS: tuple[int, ...] = (MAX_EXTRUSIONS, len(PLANE_AXES), *[len(OPERATION_KINDS) + 1] * MAX_EXTRUSIONS,
                                *[len(SHAPE_KINDS) + 1] * MAX_EXTRUSIONS, SIZE_BINS, SIZE_BINS)
_STEP = re.compile(r"Step \d+: ")
_PLANE = re.compile(r"on (?:the|a plane parallel to) (XY|XZ|YZ)\b|on an (inclined) plane")
_NORMAL_OF_PLANE = {"YZ": "X", "XZ": "Y", "XY": "Z"}
_DEPTH_AXIS = re.compile(r"looking (?:down )?along [+-]([XYZ])")


def fact_targets(text: str, prompt: str) -> list[int]:
    """One class index per FACT_GROUPS entry for an answer and the prompt it answers (which names the view); -1
    where they do not say (a description cut short, a prompt that names no view)."""
    facts = parse_description(text)
    count = min(facts.extrusions, MAX_EXTRUSIONS) - 1 if facts.extrusions else -1
    plane = _PLANE.search(text)
    axis = -1 if plane is None else PLANE_AXES.index(_NORMAL_OF_PLANE[plane.group(1)] if plane.group(1)
                                                     else "inclined")
    steps = _STEP.split(text)[1:]
    ops, shapes = [], []
    for k in range(MAX_EXTRUSIONS):
        if k >= len(steps):  # past the last step: "none", when the count says the text ended there
            none = k >= (facts.extrusions or MAX_EXTRUSIONS + 1)
            ops.append(len(OPERATION_KINDS) if none else -1)
            shapes.append(len(SHAPE_KINDS) if none else -1)
            continue
        op = _OPERATION.search(steps[k])
        shape = _SHAPE.search(steps[k])
        ops.append(OPERATION_KINDS.index(_OPERATIONS[op.group(0)]) if op else -1)
        kind = _kind(shape.group(1)) if shape else None
        shapes.append(SHAPE_KINDS.index(kind) if kind in SHAPE_KINDS else -1)
    depth = _DEPTH_AXIS.search(prompt)
    if facts.size is None or depth is None or max(facts.size) <= 0:
        extents = [-1, -1]
    else:
        largest = max(facts.size)
        extents = [min(int(facts.size[i] / largest * SIZE_BINS), SIZE_BINS - 1)
                   for i, name in enumerate("XYZ") if name != depth.group(1)]
    return [count, axis, *ops, *shapes, *extents]
