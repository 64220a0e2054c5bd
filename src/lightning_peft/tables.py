"""Rich tables that fit the terminal: long names are shortened in the middle (the end of a module
path, ``self_attn.q_proj``, is what tells rows apart), numbers are never cut (their column wraps)."""

from __future__ import annotations

ELLIPSIS = "…"


def elide_middle(text: str, width: int) -> str:
    """``text`` if it fits in ``width`` characters, else its start and (the longer) end joined by
    an ellipsis: ``model.model.layers.0.self_attn.q_proj`` -> ``model.m…ers.0.self_attn.q_proj``."""
    if width < 5 or len(text) <= width:
        return text
    keep = width - 1
    tail = (2 * keep) // 3
    return text[: keep - tail] + ELLIPSIS + text[-tail:]


def name_width(names, console_width: int, other_columns: list[int]) -> int:
    """Width for a column of ``names`` so that the table fits ``console_width``: what the other
    columns (their content widths) and rich's borders and padding (3 per column, plus 1) leave,
    at least 24 characters (the table then wraps rather than hide more)."""
    longest = max((len(n) for n in names), default=0)
    room = console_width - sum(other_columns) - 3 * (len(other_columns) + 1) - 1
    return min(longest, max(28, room))


def shorten_names(names, width: int) -> dict[str, str]:
    """``{name: shown}`` with every shown name at most ``width`` long: first the leading path
    components all names share are dropped (``model.model.layers.0.self_attn.q_proj`` ->
    ``…layers.0.self_attn.q_proj``: what differs between rows stays), then any name still too
    long loses its middle (:func:`elide_middle`)."""
    names = list(names)
    shown = {name: name for name in names}
    if not names or max(map(len, names)) <= width:
        return shown
    parts = [name.split(".") for name in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    for drop in range(1, common + 1):
        shown = {name: ELLIPSIS + ".".join(p[drop:]) for name, p in zip(names, parts)}
        if max(map(len, shown.values())) <= width:
            return shown
    return {name: elide_middle(text, width) for name, text in shown.items()}
