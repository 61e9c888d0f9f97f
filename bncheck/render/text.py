"""Text helpers every human-readable output shares: literal names, shortened names, plurals.

Node, tensor and layer names come from the model file, so they are untrusted: printed raw, an escape
sequence in a name could retitle or recolour the user's terminal, and a newline could fake a table row.
Standard library only, so that the CLI's error line can use it without loading rich.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

ELLIPSIS = "..."


def literal(text: str) -> str:
    """``text`` on one line with every non-printable character shown as its Python escape.

    ``"\\x1b]0;t\\x07"`` -> ``\\x1b]0;t\\x07`` (as visible backslash escapes), newline -> ``\\n``, tab ->
    ``\\t``; bidi overrides, zero-width and other format characters likewise. ``str.isprintable`` decides
    what is printable (Unicode categories Cc, Cf, Cs, Co, Cn, Zl, Zp and non-ASCII spaces are not).
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 sample``, ``2 samples``; ``many`` for irregular plurals (``plural(n, "info", "info")``)."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def shorten_middle(name: str, width: int, measure: Callable[[str], int] = len) -> str:
    """``name`` cut to ``width`` (as ``measure`` counts) by dropping path components from its middle.

    ``/layer1/layer1.0/bn1/BatchNormalization`` -> ``/layer1/.../bn1/BatchNormalization``: the first
    component says where in the network, the last ones which layer. A name without enough components is
    cut in the middle of its characters instead. Never returns more than ``width`` (at least 1) cells.
    """
    return shorten_names([name], width, measure)[0]


def shorten_names(names: Sequence[str], width: int, measure: Callable[[str], int] = len) -> list[str]:
    """Each name cut to ``width`` as ``shorten_middle`` does, keeping the shortened names apart.

    Exported networks repeat components (``/layer4/layer4.0/bn2/BatchNormalization`` and
    ``/layer4/layer4.1/bn2/BatchNormalization``), so the components a name keeps are chosen among several
    elisions: the first that no other name can also produce, preferring those that keep the last component,
    then the first, then the most characters.
    """
    width = max(width, 1)
    options = [_elisions(name, width, measure) or _cuts(name, width, measure) for name in names]
    producers: dict[str, int] = {}
    for candidates in options:
        for candidate in set(candidates):
            producers[candidate] = producers.get(candidate, 0) + 1
    shortened = []
    for name, candidates in zip(names, options):
        unique = [c for c in candidates if producers[c] == 1]
        if measure(name) <= width:
            shortened.append(name)
        elif unique:
            shortened.append(unique[0])
        else:
            # names that differ only inside (spindle_eeg's head.bottleneck_{detection,segmentation}.layers.N...):
            # a stretch of this one that no other name holds, between two ellipses
            others = [other for other in names if other != name]
            inner = _distinct_stretch(name, width, measure, others)
            shortened.append(inner or (candidates[0] if candidates else _cut_middle(name, width, measure)))
    return shortened


def _distinct_stretch(name: str, width: int, measure: Callable[[str], int], others: Sequence[str]) -> str | None:
    """``...stretch...``: the stretch of ``name`` that fits ``width`` between two ellipses, nearest its end,
    that no name of ``others`` contains; None where there is none."""
    room = width - 2 * len(ELLIPSIS)
    if room < 4:
        return None
    for start in range(len(name) - room - 1, 0, -1):  # strictly inside: an ellipsis stands for each side
        inner = _fit(name[start : start + room], room, measure, from_left=True)
        if inner and not any(inner in other for other in others):
            return f"{ELLIPSIS}{inner}{ELLIPSIS}"
    return None


def _elisions(name: str, width: int, measure: Callable[[str], int]) -> list[str]:
    """Ways to drop components of ``name`` that fit ``width``, best first (see ``shorten_names``).

    Kept: optionally the first and the last component, plus one run of the components between them.
    """
    parts = name.split("/")
    if parts[0] == "" and len(parts) > 1:  # "/layer1/..." keeps the empty root with its first component
        parts = ["/" + parts[1], *parts[2:]]
    count = len(parts)
    if count < 3 or measure(name) <= width:
        return []
    interior = range(1, count - 1)
    runs = [()] + [tuple(range(i, j)) for i in interior for j in range(i + 1, count)][: 4 * count * count]
    scored = []
    for keep_first in (True, False):
        for keep_last in (True, False):
            for run in runs:
                kept = set(run) | ({0} if keep_first else set()) | ({count - 1} if keep_last else set())
                if len(kept) == count or not kept:
                    continue
                text = _join(parts, kept)
                size = measure(text)
                if size <= width:
                    scored.append(((keep_last, keep_first, size), text))
    scored.sort(key=lambda item: item[0], reverse=True)
    return [text for _, text in scored]


def _join(parts: Sequence[str], kept: set[int]) -> str:
    out: list[str] = []
    for index, part in enumerate(parts):
        if index in kept:
            out.append(part)
        elif not out or out[-1] != ELLIPSIS:
            out.append(ELLIPSIS)
    return "/".join(out)


def _cuts(name: str, width: int, measure: Callable[[str], int]) -> list[str]:
    """``name`` cut in the middle of its characters to ``width``, the balanced cut first, then cuts that keep
    more of the end, then more of the start: ``backbone.encoder.0.bn`` and ``backbone.decoder.0.bn`` both cut
    to ``backbone...oder.0.bn`` balanced, apart once the cut moves."""
    if measure(name) <= width or width <= len(ELLIPSIS) + 1:
        return []
    room = width - len(ELLIPSIS)
    found = [_cut_middle(name, width, measure)]
    for right in [*range((room + 1) // 2 + 1, room), *range((room + 1) // 2 - 1, 0, -1)]:
        tail = _fit(name[len(name) - right :], right, measure, from_left=False)
        head = _fit(name[: room - measure(tail)], room - measure(tail), measure, from_left=True)
        cut = f"{head}{ELLIPSIS}{tail}"
        if cut not in found:
            found.append(cut)
    return found


def _cut_middle(name: str, width: int, measure: Callable[[str], int]) -> str:
    if width <= len(ELLIPSIS):
        return _fit(name[-width:], width, measure, from_left=False)
    room = width - len(ELLIPSIS)
    right = _fit(name[len(name) - (room + 1) // 2 :], (room + 1) // 2, measure, from_left=False)
    left = _fit(name[: room - measure(right)], room - measure(right), measure, from_left=True)
    return f"{left}{ELLIPSIS}{right}"


def _fit(text: str, width: int, measure: Callable[[str], int], from_left: bool) -> str:
    """Drop characters (from the end when ``from_left``, else from the start) until ``text`` fits."""
    while text and measure(text) > width:
        text = text[:-1] if from_left else text[1:]
    return text
