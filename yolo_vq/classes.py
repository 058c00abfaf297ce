"""Class names or ids as users give them (``--classes person 2``, ``Memory.search(classes=[...])``) -> class ids: the
one resolver behind the CLI's detection filter and the index's search filter."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

__all__ = ["class_ids"]


def class_ids(names: Mapping[int, str], wanted: Iterable[str | int],
              unknown: Callable[[str | int, dict[int, str]], str]) -> list[int]:
    """``wanted`` (names, ids, or ids as digit strings) -> ids, in order.

    Args:
        names: id -> name of the model or index (empty: any id is accepted, no name is).
        wanted: what the user asked for.
        unknown: the error message for a value that is neither a known name nor a known id, given the value and
            ``names`` (each caller says it in its own terms: a CLI flag, an index).

    Raises:
        ValueError: ``unknown(value, names)`` for the first unknown value.
    """
    names = {int(k): str(v) for k, v in names.items()}
    by_name = {v: k for k, v in names.items()}
    out = []
    for w in wanted:
        if isinstance(w, int) or str(w).isdigit():
            if not names or int(w) in names:
                out.append(int(w))
                continue
        elif w in by_name:
            out.append(by_name[w])
            continue
        raise ValueError(unknown(w, names))
    return out
