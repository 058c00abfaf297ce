"""Recipes: presets load, round-trip, and bad values get errors that say what to do."""

from __future__ import annotations

import pytest

from yolo_vq import DEFAULT_RECIPE, EmbedConfig, list_recipes, load_recipe


def test_presets_load_and_round_trip():
    names = list_recipes()
    assert {"anchor", "head-avg", "s4-stripes", "colour", DEFAULT_RECIPE} <= set(names)
    for name in names:
        cfg = load_recipe(name)
        assert cfg.name == name
        assert EmbedConfig.from_dict(cfg.to_dict()) == cfg
    assert load_recipe("default") == load_recipe(DEFAULT_RECIPE)


def test_yaml_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("mode: roi\nlevels:\n  - {layer: 4, grid: [3, 2], weight: 0.5}\n")
    cfg = load_recipe(p)
    assert cfg.name == "mine" and cfg.levels[0].grid == (3, 2) and cfg.levels[0].layer == 4


@pytest.mark.parametrize(
    "recipe,match",
    [
        ("nope", r"unknown recipe 'nope': expected one of \["),
        ("missing.yaml", "recipe file 'missing.yaml' does not exist"),
        ({"mode": "pixels"}, "mode must be one of"),
        ({"mode": "roi"}, "pools nothing"),
        ({"mode": "anchor", "levels": [{"layer": "s4"}]}, "uses the detection head's inputs only"),
        ({"mode": "roi", "levels": [{"layer": "s4", "grid": [0, 1]}]}, r"grid must be two positive ints"),
        ({"mode": "roi", "colour": {"bins": [8, 3]}}, "bins must be three positive ints"),
        ({"mode": "roi", "levels": [{"layer": "s4"}], "sampling_ratio": 0}, "sampling_ratio must be a fixed value"),
        ({"mode": "roi", "levles": []}, r"unknown recipe keys \['levles'\]"),
    ],
)
def test_bad_recipes(recipe, match):
    with pytest.raises(ValueError, match=match):
        load_recipe(recipe)
