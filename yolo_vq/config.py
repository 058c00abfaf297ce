"""Embedding recipes: frozen dataclasses that mirror ``configs/embed/*.yaml``.

A recipe says which tapped layers feed a detection's embedding and how each box is pooled on them. The default recipe
was chosen by measurement (``benchmarks/retrieval.py``, results in ``docs/benchmarks.md``), not by taste.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


__all__ = ["DEFAULT_RECIPE", "ColourSpec", "EmbedConfig", "LevelSpec", "list_recipes", "load_recipe"]

# Chosen from the recipe table in docs/benchmarks.md (vtest.avi, yolo11n-pose, imgsz 1280, ByteTrack identities).
DEFAULT_RECIPE = "s4-8stripes-colour-center"

_MODES = ("roi", "anchor")


@dataclass(frozen=True)
class LevelSpec:
    """How boxes are pooled on one tapped layer.

    Attributes:
        layer: layer index, or a named layer: ``"p3"``/``"p4"``/``"p5"`` (detection-head inputs) or ``"s4"``/``"s8"``/
            ``"s16"``/``"s32"`` (last backbone layer with that stride).
        grid: RoIAlign output cells ``(rows, cols)`` kept and flattened; ``(1, 1)`` is a plain average,
            ``(6, 1)`` six horizontal stripes. The vector has ``channels * rows * cols`` entries.
        samples: RoIAlign bins per output cell along each axis (averaged), so thin stripes still see enough of the box.
        weight: weight of this level after its own L2 normalisation.
    """

    layer: int | str
    grid: tuple[int, int] = (1, 1)
    samples: int = 2
    weight: float = 1.0

    def __post_init__(self) -> None:
        grid = tuple(int(g) for g in self.grid)
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be two positive ints (rows, cols), got {self.grid!r}: e.g. grid: [6, 1]")
        object.__setattr__(self, "grid", grid)
        if int(self.samples) < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples!r}")
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight!r}")


@dataclass(frozen=True)
class ColourSpec:
    """A per-stripe HSV colour histogram of the box, computed from the letterboxed network input.

    Attributes:
        stripes: horizontal stripes of the box, each with its own histogram.
        bins: number of bins for hue, saturation and value (a joint histogram of ``prod(bins)`` cells per stripe).
        stride: the input is average-pooled by this factor before binning (a 4 px cell is one colour sample).
        weight: weight of the colour part after its own L2 normalisation.
    """

    stripes: int = 6
    bins: tuple[int, int, int] = (8, 3, 3)
    stride: int = 4
    weight: float = 1.0

    def __post_init__(self) -> None:
        bins = tuple(int(b) for b in self.bins)
        if len(bins) != 3 or min(bins) < 1:
            raise ValueError(f"bins must be three positive ints (hue, saturation, value), got {self.bins!r}")
        object.__setattr__(self, "bins", bins)
        if self.stripes < 1 or self.stride < 1:
            raise ValueError(f"stripes and stride must be >= 1, got stripes={self.stripes}, stride={self.stride}")
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight!r}")

    @property
    def dim(self) -> int:
        """Length of the colour part of the embedding."""
        return self.stripes * self.bins[0] * self.bins[1] * self.bins[2]


@dataclass(frozen=True)
class EmbedConfig:
    """A per-detection embedding recipe.

    Attributes:
        name: the recipe's name (a preset in ``configs/embed``, or ``"custom"``).
        mode: ``"roi"`` pools each box on the tapped maps with RoIAlign; ``"anchor"`` takes the feature vector of the
            head cell that produced the detection (Ultralytics' ReID-tracker features), the baseline.
        levels: pooled layers (``roi`` mode). Empty with a ``colour`` part gives a colour-only embedding.
        colour: optional HSV-histogram cue fused with the CNN part.
        sampling_ratio: RoIAlign samples per bin; fixed (not adaptive) so embeddings are reproducible and exportable.
        center: subtract each level's frame-average feature before normalising (removes what the whole scene shares).
        level_norm: L2-normalise each level (and the colour part) before weighting and concatenation.
        final_norm: L2-normalise the whole vector.
    """

    name: str = "custom"
    mode: str = "roi"
    levels: tuple[LevelSpec, ...] = ()
    colour: ColourSpec | None = None
    sampling_ratio: int = 2
    center: bool = False
    level_norm: bool = True
    final_norm: bool = True

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        levels = tuple(lv if isinstance(lv, LevelSpec) else LevelSpec(**lv) for lv in self.levels)
        object.__setattr__(self, "levels", levels)
        if isinstance(self.colour, dict):
            object.__setattr__(self, "colour", ColourSpec(**self.colour))
        if self.mode == "roi" and not levels and self.colour is None:
            raise ValueError(f"recipe {self.name!r} pools nothing: give 'levels' and/or 'colour' for mode 'roi'")
        if self.mode == "anchor" and (levels or self.colour is not None):
            raise ValueError(
                f"recipe {self.name!r}: mode 'anchor' uses the detection head's inputs only; remove 'levels'/'colour'"
            )
        if self.sampling_ratio < 1:
            raise ValueError(f"sampling_ratio must be a fixed value >= 1, got {self.sampling_ratio} (see PITFALLS: "
                             "adaptive sampling flips grid size on rounding)")

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON/YAML-serialisable dict that ``EmbedConfig.from_dict`` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbedConfig:
        """Build from a dict such as a parsed YAML preset; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"unknown recipe keys {unknown}; expected some of {sorted(known)}")
        d = dict(d)
        d["levels"] = tuple(LevelSpec(**lv) for lv in d.get("levels") or ())
        if d.get("colour") is not None:
            d["colour"] = ColourSpec(**d["colour"])
        return cls(**d)


def _preset_dir() -> Path:
    # Installed wheels carry the presets as package data (yolo_vq/configs); a source checkout reads configs/ directly.
    packaged = resources.files("yolo_vq") / "configs" / "embed"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "configs" / "embed"


def list_recipes() -> list[str]:
    """Names of the shipped recipe presets."""
    return sorted(p.stem for p in _preset_dir().glob("*.yaml"))


def load_recipe(recipe: str | Path | dict | EmbedConfig = DEFAULT_RECIPE) -> EmbedConfig:
    """Resolve a recipe given as an ``EmbedConfig``, a dict, a preset name (``"default"`` included) or a YAML path."""
    if isinstance(recipe, EmbedConfig):
        return recipe
    if isinstance(recipe, dict):
        return EmbedConfig.from_dict(recipe)
    name = DEFAULT_RECIPE if recipe == "default" else str(recipe)
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = _preset_dir() / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown recipe {recipe!r}: expected one of {list_recipes()} or a path to a .yaml file")
    elif not path.is_file():
        raise ValueError(f"recipe file {str(path)!r} does not exist: pass a preset name ({list_recipes()}) or a path")
    import yaml  # here, not at import: the CLI builds its parsers (and the edge runner runs) without it

    d = yaml.safe_load(path.read_text()) or {}
    if not isinstance(d, dict):
        raise ValueError(f"recipe file {str(path)!r} must hold a mapping of recipe keys, got {type(d).__name__}")
    d.setdefault("name", path.stem)
    return EmbedConfig.from_dict(d)


