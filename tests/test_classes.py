"""The one class-name resolver behind ``--classes`` and ``Memory.search(classes=...)``."""

from __future__ import annotations

import pytest

from yolo_vq.classes import class_ids

NAMES = {0: "person", 1: "bicycle", 2: "car"}


def unknown(value, names):
    return f"unknown {value!r} of {len(names)}"


def test_names_ids_and_digit_strings_resolve_in_order():
    assert class_ids(NAMES, ["car", 0, "1"], unknown) == [2, 0, 1]
    assert class_ids({}, ["7", 3], unknown) == [7, 3]  # no names known: any id, no name


@pytest.mark.parametrize("value", ["unicorn", "9", 9])
def test_an_unknown_name_or_id_is_the_callers_message(value):
    with pytest.raises(ValueError, match=f"unknown {value!r} of 3"):
        class_ids(NAMES, ["person", value], unknown)
    with pytest.raises(ValueError, match="unknown 'person' of 0"):
        class_ids({}, ["person"], unknown)
