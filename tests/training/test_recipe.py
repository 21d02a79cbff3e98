"""Recipes: the default recipe as a file, strict validation, flags over file values, the Python API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_service.core.artifact import load_artifact
from adapter_service.training import RecipeError, load_recipe, train_artifact
from adapter_service.training.api import resolve
from adapter_service.training.recipe import KEYS, RECIPES, to_toml

CHAMELEON = Path(sys.executable).with_name("chameleon")
DEMO = Path(__file__).parents[2] / "adapter_service" / "data" / "demo-artifact"
UNSET_BY_DEFAULT = {"max_per_label", "max_delta_norm", "warmup_steps", "expert_steps"}


def test_the_default_recipe_sets_every_key_but_the_optional_ones() -> None:
    values = load_recipe()
    assert set(values) == set(KEYS) - UNSET_BY_DEFAULT
    assert (values["targets"], values["network"], values["bases"], values["rank"]) == (
        "auto",
        "mixture",
        12,
        4,
    )
    assert (values["lr"], values["steps"], values["schedule"]) == (4e-3, 150, "cosine")


def test_printed_config_reads_back_as_the_same_recipe(tmp_path: Path) -> None:
    settings = resolve("demo", {"lr": 1e-3, "seeds": [3]})
    path = tmp_path / "printed.toml"
    path.write_text(to_toml(settings, "printed"))
    assert resolve(path) == settings


def test_the_demo_artifact_names_its_recipe_and_was_made_with_it() -> None:
    facts = load_artifact(DEMO).manifest.hypernetwork
    assert (RECIPES / f"{facts['recipe']}.toml").is_file()
    recipe = resolve(facts["recipe"])
    for key in ("data", "max_per_label", "prompt_tokens", "continuation_tokens", "split_seed", "lr", "seed",
                "bases", "batch_size", "batching", "train_k", "warmup_steps", "schedule", "clip_grad_norm",
                "shared_bases", "statistic", "network", "kind"):  # fmt: skip
        assert facts[key] == recipe[key], key
    assert facts["steps"] == recipe["steps"] and facts["config"]["rank"] == recipe["rank"] * recipe["bases"]
    assert facts["config"]["routing_sharpness"] == recipe["routing_sharpness"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[adapter]\nrnak = 4\n", r"key 'rnak' in \[adapter\]: expected one of"),
        ("[adapter]\nlr = 0.1\n", r"key 'lr' in \[adapter\]: it belongs in \[optimisation\]"),
        ("[optimisation]\nlr = 'fast'\n", r"key 'lr' \(--lr\): expected float or int, got 'fast'"),
        ("[adapter]\nnetwork = 'big'\n", r"key 'network' \(--network\): expected 'full' or 'mixture'"),
        ("[training]\nsteps = 3\n", r"section \[training\]: expected one of"),
        ("steps = 3\n", r"key 'steps' at the top: expected a \[section\]"),
        ("[train]\nseed = true\n", r"key 'seed' \(--seed\): expected int, got True"),
        ("extends = 'nonesuch'\n", r"recipe 'nonesuch': expected a .toml path or a shipped recipe"),
        ("[adapter\n", "not valid TOML"),
    ],
)
def test_a_bad_recipe_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_extends_loops_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("extends = 'b.toml'\n")
    (tmp_path / "b.toml").write_text("extends = 'a.toml'\n")
    with pytest.raises(RecipeError, match="loops back"):
        load_recipe(tmp_path / "a.toml")


def test_flags_override_the_file_and_the_file_overrides_the_default(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.toml"
    recipe.write_text(
        "extends = 'default'\n[optimisation]\nlr = 0.01\nsteps = 7\n[inputs]\ndata = 'x.jsonl'\n"
    )
    shown = subprocess.run(
        [str(CHAMELEON), "train", "--config", str(recipe), "--steps", "9", "--print-config"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    printed = load_recipe_text(tmp_path, shown)
    assert (printed["lr"], printed["steps"], printed["data"], printed["bases"]) == (0.01, 9, "x.jsonl", 12)
    bad = subprocess.run(
        [str(CHAMELEON), "train", "--config", str(recipe), "--train-k", "most", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "(--train-k): expected 'auto', 'request' or a number" in bad.stderr


def load_recipe_text(tmp_path: Path, text: str) -> dict:
    path = tmp_path / "shown.toml"
    path.write_text(text)
    return load_recipe(path)


def test_python_api_trains_from_a_recipe_file(tmp_path: Path) -> None:
    from samples import SENTENCES, tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    lines = [" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(5)) + f" {i}" for i in range(40)]
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        "extends = 'default'\n[inputs]\nprompt_tokens = 4\ncontinuation_tokens = 4\n"
        "[adapter]\ntargets = ['v_proj']\nrank = 2\nbases = 2\nhidden = 8\n"
        "[optimisation]\nsteps = 2\neval_every = 1\nbatch_size = 4\n"
    )
    outcome = train_artifact(tmp_path / "art", recipe, model=str(model_dir), data=str(data))
    facts = outcome.artifact.manifest.hypernetwork
    assert facts["recipe"] == str(recipe) and facts["steps"] == 2 and outcome.targets == ["v_proj"]
    assert outcome.artifact.manifest.grouping == "policy"  # unlabelled data: routed by distance
