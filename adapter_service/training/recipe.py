"""Recipes: every setting of `chameleon train` and `eval` in a TOML file instead of thirty flags.

A recipe is a TOML file of sections (for reading only: keys are unique across sections) whose keys are
the command-line options with underscores (`max_per_label` is `--max-per-label`). `extends = "NAME"`
starts from another recipe (a shipped name such as "default", or a path relative to the file). The
shipped recipes live in `recipes/`; `default` is what the commands use when given none. Unknown keys
and values of the wrong type are refused with the key's name and the expected type, so a typo is never
silently ignored.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RECIPES = Path(__file__).with_name("recipes")
DEFAULT = "default"

# key -> accepted Python types. Keys that may be unset (None) are absent from the default recipe.
_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "data": (str,),
    "max_per_label": (int,),
    "drop_label": (list,),
    "split_seed": (int,),
    "split_by": (str,),
    "prompt_tokens": (int,),
    "continuation_tokens": (int,),
    "targets": (str, list),
    "network": (str,),
    "bases": (int,),
    "rank": (int,),
    "shared_bases": (int,),
    "routing": (str,),
    "routing_sharpness": (float, int),
    "hidden": (int,),
    "statistic": (str,),
    "max_delta_norm": (float, int),
    "steps": (int,),
    "batch_size": (int,),
    "lr": (float, int),
    "schedule": (str,),
    "warmup_steps": (int,),
    "clip_grad_norm": (float, int),
    "eval_every": (int,),
    "patience": (int,),
    "batching": (str,),
    "train_k": (str, int),
    "max_k": (int,),
    "kind": (str,),
    "seed": (int,),
    "baseline": (str,),
    "min_gain": (float, int),
    "fallback_to_static": (bool,),
    "unsure_fallback": (bool,),
    "seeds": (list,),
    "lrs": (list,),
    "experts": (bool,),
    "expert_batch_size": (int,),
    "expert_steps": (int,),
    "oracle_statistic": (bool,),
}
_CHOICES = {
    "network": ("full", "mixture"),
    "routing": ("auto", "distance", "table", "classifier", "predicted-label", "pseudo-label"),
    "schedule": ("constant", "cosine"),
    "batching": ("mixed", "coherent"),
    "kind": ("hyper", "static"),
    "split_by": ("source", "document"),
    "baseline": ("static", "none"),
}
_SECTIONS = {
    "inputs": ("model", "data", "max_per_label", "drop_label", "split_seed", "split_by", "prompt_tokens",
               "continuation_tokens"),
    "adapter": ("targets", "network", "bases", "rank", "shared_bases", "routing", "routing_sharpness",
                "hidden", "statistic", "max_delta_norm"),
    "optimisation": ("steps", "batch_size", "lr", "schedule", "warmup_steps", "clip_grad_norm",
                     "eval_every", "patience", "batching", "train_k", "max_k"),
    "train": ("kind", "seed", "baseline", "min_gain", "fallback_to_static", "unsure_fallback"),
    "eval": ("seeds", "lrs", "experts", "expert_batch_size", "expert_steps", "oracle_statistic"),
}  # fmt: skip
KEYS = tuple(_TYPES)


class RecipeError(ValueError):
    """A recipe file that cannot be used; the message names the file and the key."""


def recipe_path(source: str | Path) -> Path:
    """A shipped recipe's name ("default", "demo") or a path to a .toml file."""
    text = str(source)
    if "/" not in text and not text.endswith(".toml"):
        path = RECIPES / f"{text}.toml"
        if not path.is_file():
            shipped = sorted(p.stem for p in RECIPES.glob("*.toml"))
            raise RecipeError(f"recipe {text!r}: expected a .toml path or a shipped recipe ({shipped})")
        return path
    path = Path(text)
    if not path.is_file():
        raise RecipeError(f"recipe {text!r}: no such file")
    return path


def load_recipe(source: str | Path = DEFAULT, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The flat, validated settings of a recipe (after its `extends` chain); unset keys are absent."""
    path = recipe_path(source).resolve()
    if path in _seen:
        raise RecipeError(f"{path}: 'extends' loops back to {path.name}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML ({exc})") from exc
    parent = data.pop("extends", None)
    values: dict[str, Any] = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise RecipeError(f"{path}: key 'extends': expected a recipe name or path, got {parent!r}")
        relative = path.parent / parent
        values = load_recipe(relative if relative.is_file() else parent, (*_seen, path))
    for section, table in data.items():
        if not isinstance(table, dict):
            raise RecipeError(f"{path}: key {section!r} at the top: expected a [section] ({list(_SECTIONS)})")
        if section not in _SECTIONS:
            raise RecipeError(f"{path}: section [{section}]: expected one of {list(_SECTIONS)}")
        for key, value in table.items():
            if key not in _SECTIONS[section]:
                home = next((s for s, keys in _SECTIONS.items() if key in keys), None)
                where = f"it belongs in [{home}]" if home else f"expected one of {list(_SECTIONS[section])}"
                raise RecipeError(f"{path}: key {key!r} in [{section}]: {where}")
            values[key] = check(key, value, str(path))
    return values


def check(key: str, value: Any, where: str = "recipe") -> Any:
    """`value` for `key` if its type (and choice) is right; raises RecipeError naming both."""
    types = _TYPES[key]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and key in _CHOICES:
        ok = value in _CHOICES[key]
    if ok and key == "targets":
        ok = isinstance(value, str) or all(isinstance(t, str) and t for t in value)
    if ok and key == "train_k" and isinstance(value, str):
        ok = value in ("auto", "request") or value.isdigit()
    if ok and key in ("seeds", "drop_label", "lrs"):
        item = str if key == "drop_label" else (int if key == "seeds" else (float, int))
        ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    if not ok:
        expected = " or ".join(t.__name__ for t in types)
        if key in _CHOICES:
            expected = " or ".join(repr(c) for c in _CHOICES[key])
        elif key == "train_k":
            expected = "'auto', 'request' or a number"
        flag = "--" + key.replace("_", "-")
        raise RecipeError(f"{where}: key {key!r} ({flag}): expected {expected}, got {value!r}")
    return float(value) if float in types and isinstance(value, int) and int not in types else value


def to_toml(values: Mapping[str, Any], header: str = "") -> str:
    """The settings as a recipe file, in the shipped sections; unset keys are written as comments."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for section, keys in _SECTIONS.items():
        lines += ["", f"[{section}]"]
        for key in keys:
            value = values.get(key)
            lines.append(f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
