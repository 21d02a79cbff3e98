"""The fair-comparison study on a tiny model: every method, CIs, resumability."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adapter_service.core.clustering import FixedK
from adapter_service.training.evaluation import (
    StudyConfig,
    bootstrap_ci,
    headroom_share_ci,
    run_study,
    seed_bootstrap_ci,
)
from adapter_service.training.report import write_report
from conftest import tiny_llama
from samples import synthetic


def test_headroom_share_comes_with_an_interval_over_seeds_and_documents() -> None:
    rng = np.random.default_rng(1)
    documents = rng.normal(3.0, 0.5, 400)  # what every method shares: each document's difficulty

    def method(offset: float, seeds: int = 3) -> np.ndarray:
        return documents + offset + rng.normal(0, 0.01, (seeds, 1)) + rng.normal(0, 0.02, (seeds, 400))

    static, experts = method(0.0), method(-0.2)
    share, lo, hi = headroom_share_ci(method(-0.1), static, experts)
    assert abs(share - 0.5) < 0.1 and lo < share < hi and lo > 0  # half the headroom, clearly above 0
    none_of_it = headroom_share_ci(static.copy(), static, experts)  # the static LoRA itself: 0%
    assert none_of_it[0] == 0 and none_of_it[1] < 0 < none_of_it[2]
    assert headroom_share_ci(method(-0.1, seeds=1), static, experts) is None  # one seed: no interval
    no_gain = headroom_share_ci(method(-0.1), static, method(0.0))  # experts as good as static
    assert no_gain[1:] == (None, None)
    with pytest.raises(ValueError, match="expected \\[seeds, documents\\] arrays over the same documents"):
        headroom_share_ci(static[:, :10], static, experts)


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_more_documents() -> None:
    rng = np.random.default_rng(0)
    small = rng.normal(2.0, 0.5, 30)
    large = rng.normal(2.0, 0.5, 3000)
    m, lo, hi = bootstrap_ci(small)
    assert lo < m < hi
    _, lo2, hi2 = bootstrap_ci(large)
    assert (hi2 - lo2) < (hi - lo) / 5


def test_seed_bootstrap_counts_a_training_runs_luck_as_noise() -> None:
    """Per-seed offsets the size of the difference: the document-only interval excludes zero, the one
    over seeds and documents does not; a difference far beyond the seed spread stays significant."""
    rng = np.random.default_rng(0)
    documents = rng.normal(3.0, 0.5, 300)
    reference = documents + np.array([-0.01, 0.0, 0.01])[:, None]
    lucky = documents + np.array([0.0, 0.02, 0.01])[:, None]  # mean +0.01: within the seeds' spread
    _, lo, hi = bootstrap_ci(lucky.mean(0) - reference.mean(0))
    assert 0 < lo <= hi
    delta, lo, hi = seed_bootstrap_ci(lucky, reference)
    assert delta == pytest.approx(0.01) and lo < 0 < hi
    better = documents - 0.1 + np.array([0.0, 0.02, 0.01])[:, None]
    _, lo, hi = seed_bootstrap_ci(better, reference)
    assert lo < hi < 0
    assert seed_bootstrap_ci(lucky[:1], reference) is None  # one seed: no spread to resample
    with pytest.raises(ValueError, match="runs, reference: expected"):
        seed_bootstrap_ci(lucky[:, :10], reference)


def test_study_runs_every_method_and_resumes(tmp_path: Path) -> None:
    model = tiny_llama()
    config = StudyConfig(
        targets=["v_proj"],
        rank=2,
        hidden=8,
        seeds=[0, 1],
        batch_size=6,
        max_steps=4,
        eval_every=2,
        eval_ks=(1, 3),
    )
    args = (model, synthetic(36, 1), synthetic(12, 2), synthetic(12, 3), config, tmp_path / "study")
    report = run_study(*args, progress=False)
    methods = report["methods"]
    expected = {
        "base",
        "static LoRA (same rank)",
        "Chameleon, auto k",
        "Chameleon, k=1",
        "Chameleon, k=3",
        "Chameleon, per request",
        "per-domain experts",
    }
    assert expected <= set(methods)
    assert any(name.startswith("static LoRA (rank ") for name in methods)  # equal-parameter baseline
    for name, entry in methods.items():
        lo, hi = entry["ci95"]
        assert lo <= entry["mean_nll"] <= hi
        assert entry["seeds"] == (1 if name == "base" else 2)
    assert methods["static LoRA (same rank)"]["vs_static_same_rank"]["delta"] == 0.0
    best = report["headroom"]["best_static"]
    assert best.startswith("static LoRA") and methods[best]["vs_best_static"]["delta"] == 0.0
    gain = report["headroom"]["experts_gain_over_best_static"]
    experts = methods["per-domain experts"]
    assert gain == methods[best]["mean_nll"] - experts["mean_nll"]
    if gain > 0:  # the experts' share of their own headroom is all of it
        assert abs(experts["share_of_expert_headroom"] - 1.0) < 1e-9
    # Validation, never test, is what choices are made on: every trained baseline's best validation NLL,
    # and Chameleon's under each serving policy, per seed.
    validation = report["validation"]
    assert {
        "static LoRA (same rank)",
        "Chameleon, auto k",
        "Chameleon, k=3",
        "Chameleon, per request",
    } <= set(validation)
    assert all(len(v["per_seed"]) == 2 and v["mean"] == np.mean(v["per_seed"]) for v in validation.values())
    assert validation["Chameleon, per request"]["mean"] != methods["Chameleon, per request"]["mean_nll"]
    files = sorted((tmp_path / "study" / "runs").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    again = run_study(*args, progress=False)  # everything cached: nothing retrained or rewritten
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "study" / "runs").iterdir())] == stamps
    assert again["methods"] == methods
    assert again["latency_per_batch"]["base_forward_ms"] > 0
    assert set(again["per_label"]["per-domain experts"]) == {"d0", "d1", "d2"}
    assert again["grouping"]["labels"] == 3 and again["grouping"]["knn_accuracy"] > 0.6  # chance: 1/3
    # Each saved run carries its own compute time, so a resumed study still knows what it cost.
    timing = report["run_seconds"]
    assert timing["runs"] == len(files) and timing["untimed"] == 0 and timing["total"] > 0
    assert again["run_seconds"] == timing
    old = files[0]
    record = json.loads(old.read_text())
    del record["run_seconds"]  # a run saved before runs were timed
    old.write_text(json.dumps(record))
    assert run_study(*args, progress=False)["run_seconds"]["untimed"] == 1
    write_report(again, tmp_path / "study", "chameleon eval ...", 12.0, invocations=2)
    text = (tmp_path / "study" / "report.md").read_text()
    assert "Compute of the runs used:" in text
    assert "Mean validation NLL (what choices between methods and recipes are made on" in text


def quick_config(**overrides) -> StudyConfig:
    """Two steps, one seed, no experts: enough to exercise the study's bookkeeping."""
    settings = dict(
        targets=["v_proj"],
        rank=2,
        hidden=8,
        seeds=[0],
        batch_size=6,
        max_steps=2,
        eval_every=2,
        eval_ks=(1,),
        experts=False,
    )
    return StudyConfig(**{**settings, **overrides})


def test_study_directory_refuses_another_configuration_but_takes_more_seeds(tmp_path: Path) -> None:
    import dataclasses

    import pytest

    model = tiny_llama()
    config = quick_config()
    data = (synthetic(24, 1), synthetic(12, 2), synthetic(12, 3))
    out = tmp_path / "study"
    run_study(model, *data, config, out, progress=False)
    more = run_study(model, *data, dataclasses.replace(config, seeds=[0, 1]), out, progress=False)
    assert more["methods"]["Chameleon, auto k"]["seeds"] == 2
    with pytest.raises(ValueError, match=r"another study \(different lr\)"):
        run_study(model, *data, dataclasses.replace(config, lr=5e-3), out, progress=False)
    with pytest.raises(ValueError, match=r"different data"):
        run_study(model, data[0], data[1], synthetic(12, 4), config, out, progress=False)


def test_study_trains_on_label_coherent_batches_when_asked(tmp_path: Path, monkeypatch) -> None:
    import adapter_service.training.evaluation as evaluation

    seen = []
    real_train = evaluation.train
    monkeypatch.setattr(
        evaluation, "train", lambda *a, **k: seen.append(a[6].batching) or real_train(*a, **k)
    )
    config = quick_config(batching="coherent")
    report = run_study(
        tiny_llama(), synthetic(36, 1), synthetic(12, 2), synthetic(12, 3), config, tmp_path / "s"
    )
    assert seen and set(seen) == {"coherent"}
    assert "Chameleon, auto k" in report["methods"]


def test_mixture_study_compares_against_statics_of_its_rank_and_of_one_basis(tmp_path: Path) -> None:
    """A mixture of 3 bases of rank 2 emits rank 6: the same-rank static LoRA is rank 6 (its parameter
    count too), the one-basis static LoRA and every expert rank 2; the shuffled-statistic control runs."""
    config = quick_config(network="mixture", bases=3, experts=True, train_policy=FixedK(6))
    report = run_study(
        tiny_llama(), synthetic(36, 1), synthetic(12, 2), synthetic(12, 3), config, tmp_path / "m"
    )
    methods = report["methods"]
    assert "static LoRA (rank 2, one basis)" in methods
    assert "Chameleon, per request, shuffled statistic" in methods
    assert methods["static LoRA (same rank)"]["params"] == methods["per-domain experts"]["params"]
    assert methods["static LoRA (rank 2, one basis)"]["params"] * 3 == methods["per-domain experts"]["params"]


def test_skipped_runs_are_neither_computed_nor_reported(tmp_path: Path) -> None:
    config = quick_config(network="mixture", bases=3, experts=False, train_policy=FixedK(6))
    out = tmp_path / "m"
    report = run_study(
        tiny_llama(), synthetic(36, 1), synthetic(12, 2), synthetic(12, 3), config, out, skip=["static-basis"]
    )
    assert report["skipped_runs"] == ["static-basis"]
    assert not any(name.startswith("static LoRA (rank 2") for name in report["methods"])
    assert "static LoRA (same rank)" in report["methods"]
    assert not list((out / "runs").glob("static-basis-*"))
    write_report(report, out)
    assert "Runs left out of this study (`--skip`): static-basis." in (out / "report.md").read_text()


def test_only_computes_the_named_runs_and_a_plain_call_gathers_them(tmp_path: Path) -> None:
    """Parallel workers (`only`) each write their own runs and no report; a plain call reuses them all."""
    model = tiny_llama()
    config = quick_config(seeds=[0, 1])
    data = (synthetic(24, 1), synthetic(12, 2), synthetic(12, 3))
    out = tmp_path / "study"
    assert run_study(model, *data, config, out, progress=False, only=["static"]) == {
        "computed_only": ["static"]
    }
    assert sorted(f.name for f in (out / "runs").iterdir()) == ["static-seed0.json", "static-seed1.json"]
    assert not (out / "report.json").exists()
    stamp = (out / "runs" / "static-seed1.json").stat().st_mtime_ns
    report = run_study(model, *data, config, out, progress=False)
    assert (out / "runs" / "static-seed1.json").stat().st_mtime_ns == stamp  # reused, not retrained
    assert (
        report["methods"]["static LoRA (same rank)"]["seeds"] == 2
        and "Chameleon, auto k" in report["methods"]
    )


def test_several_learning_rates_each_method_takes_its_best_on_validation(tmp_path: Path) -> None:
    """`lrs`: every trained run is saved per rate; per seed, the one with the best validation NLL is
    scored (the experts choose per label), and the report says which rate each took."""
    import pytest

    model = tiny_llama()
    lrs = (1e-4, 5e-2)
    config = quick_config(lrs=lrs, experts=True, max_steps=4)
    data = (synthetic(36, 1), synthetic(12, 2), synthetic(12, 3))
    out = tmp_path / "study"
    report = run_study(model, *data, config, out, progress=False)

    def saved(name: str, lr: float) -> dict:
        return json.loads((out / "runs" / f"{name}-lr{lr:g}-seed0.json").read_text())

    assert not list((out / "runs").glob("*-lr*-lr*"))
    assert report["lr_selection"]["candidates"] == list(lrs)
    picks = report["lr_selection"]["picks"]
    static = {lr: saved("static", lr) for lr in lrs}
    assert static[lrs[0]]["per_doc"] != static[lrs[1]]["per_doc"]  # the choice matters
    best = min(lrs, key=lambda lr: static[lr]["best_validation_nll"])
    assert picks["static LoRA (same rank)"] == [best]
    assert report["methods"]["static LoRA (same rank)"]["mean_nll"] == pytest.approx(
        np.mean(static[best]["per_doc"])
    )
    hyper = {lr: saved("hyper", lr) for lr in lrs}
    best = min(lrs, key=lambda lr: hyper[lr]["best_validation_nll"])
    assert picks["Chameleon (every policy)"] == [best]
    assert report["methods"]["Chameleon, per request"]["mean_nll"] == pytest.approx(
        np.mean(hyper[best]["scores"]["per request"])
    )
    experts = {lr: saved("experts", lr) for lr in lrs}
    labels = np.array([e.label for e in data[2]])
    expected = np.full(len(labels), np.nan)
    ((chosen),) = picks["per-domain experts"]
    assert sorted(chosen) == ["d0", "d1", "d2"]
    for label, lr in chosen.items():
        assert lr == min(lrs, key=lambda x: experts[x]["validation"][label])
        expected[labels == label] = np.asarray(experts[lr]["per_doc"])[labels == label]
    assert report["methods"]["per-domain experts"]["mean_nll"] == pytest.approx(expected.mean())
    write_report(report, out)
    text = (out / "report.md").read_text()
    assert "Learning rate chosen on validation, per method and seed, from 0.0001, 0.05" in text
    assert f"- static LoRA (same rank): {picks['static LoRA (same rank)'][0]:g}" in text

    # An experts run saved before experts recorded their validation cannot be compared: refused.
    path = out / "runs" / f"experts-lr{lrs[0]:g}-seed0.json"
    record = json.loads(path.read_text())
    del record["validation"]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"experts run at lr 0\.0001 has no per-label validation NLL"):
        run_study(model, *data, config, out, progress=False)


def test_a_multi_rate_study_reuses_single_rate_studies_instead_of_retraining(
    tmp_path: Path, monkeypatch
) -> None:
    import dataclasses

    import pytest

    import adapter_service.training.evaluation as evaluation

    model = tiny_llama()
    data = (synthetic(36, 1), synthetic(12, 2), synthetic(12, 3))
    single = quick_config(experts=True, max_steps=4)
    sources = []
    for lr in (1e-4, 5e-2):
        sources.append(tmp_path / f"lr{lr:g}")
        run_study(model, *data, dataclasses.replace(single, lr=lr), sources[-1], progress=False)
    legacy = sources[0] / "runs" / "experts-seed0.json"  # saved before experts recorded validation
    record = json.loads(legacy.read_text())
    validation = record.pop("validation")
    legacy.write_text(json.dumps(record))

    trained = []
    real_train = evaluation.train
    monkeypatch.setattr(evaluation, "train", lambda *a, **k: trained.append(a[6].lr) or real_train(*a, **k))
    multi = dataclasses.replace(single, lrs=(1e-4, 5e-2))
    report = run_study(model, *data, multi, tmp_path / "both", progress=False, reuse=sources)
    assert trained == [1e-4] * 3  # only the legacy experts (one per label); everything else reused
    runs = tmp_path / "both" / "runs"
    assert json.loads((runs / "static-lr0.05-seed0.json").read_text()) == json.loads(
        (sources[1] / "runs" / "static-seed0.json").read_text()
    )
    assert set(report["lr_selection"]["picks"]) == {
        "static LoRA (same rank)",
        "static LoRA (rank 12, ~hyper params)",
        "Chameleon (every policy)",
        "per-domain experts",
    }
    assert json.loads((runs / "experts-lr0.0001-seed0.json").read_text())["validation"] == pytest.approx(
        validation
    )

    with pytest.raises(ValueError, match=r"reuse: .* \(different rank\)"):
        run_study(
            model, *data, dataclasses.replace(multi, rank=3), tmp_path / "r3", progress=False, reuse=sources
        )
    with pytest.raises(ValueError, match=r"ran at lr 0\.05, not one of this study.s"):
        run_study(model, *data, dataclasses.replace(multi, lrs=(1e-4, 1e-3)), tmp_path / "x", reuse=sources)
    with pytest.raises(ValueError, match=r"reuse: .* other data"):
        other = (data[0], data[1], synthetic(12, 4))
        run_study(model, *other, multi, tmp_path / "y", progress=False, reuse=sources)
    with pytest.raises(ValueError, match=r"a study of several learning rates; this study has one"):
        run_study(model, *data, single, tmp_path / "z", progress=False, reuse=[tmp_path / "both"])
    # A study of several rates gives its runs, rate by rate, to another: a routing variant trains only
    # its generator, and the rates it does not check are left behind.
    trained.clear()
    variant = dataclasses.replace(multi, lrs=(5e-2,), hidden=4)
    run_study(
        model, *data, variant, tmp_path / "v", progress=False, reuse=[tmp_path / "both"], skip=("static-big",)
    )
    assert trained == [5e-2]  # the generator only
    taken = sorted(p.name for p in (tmp_path / "v" / "runs").iterdir())
    assert "static-lr0.05-seed0.json" in taken and not any("lr0.0001" in name for name in taken)


def test_a_longer_shared_budget_reuses_only_the_experts_it_leaves_unchanged(
    tmp_path: Path, monkeypatch
) -> None:
    """`expert_steps` keeps the experts' budget when the shared methods get more steps: a study that
    differs only there takes the experts' runs, and retrains static LoRAs and the hyper-network."""
    import dataclasses

    import pytest

    import adapter_service.training.evaluation as evaluation
    from adapter_service.training.report import write_report

    model = tiny_llama()
    data = (synthetic(36, 1), synthetic(12, 2), synthetic(12, 3))
    short = quick_config(experts=True, max_steps=2)
    run_study(model, *data, short, tmp_path / "short", progress=False)

    trained = []
    real_train = evaluation.train
    monkeypatch.setattr(
        evaluation, "train", lambda *a, **k: trained.append(a[6].max_steps) or real_train(*a, **k)
    )
    longer = dataclasses.replace(short, max_steps=4, expert_steps=2)
    report = run_study(model, *data, longer, tmp_path / "long", progress=False, reuse=[tmp_path / "short"])
    assert trained and set(trained) == {4}  # static, static-basis/big and hyper; no expert retrained
    experts = json.loads((tmp_path / "long" / "runs" / "experts-seed0.json").read_text())
    assert experts == json.loads((tmp_path / "short" / "runs" / "experts-seed0.json").read_text())
    assert "per-domain experts" in report["methods"]
    assert (report["max_steps"], report["expert_steps"], report["expert_batch_size"]) == (4, 2, 8)
    write_report(report, tmp_path / "long")
    assert (
        "at most 4 steps of batch 6 (each per-domain expert: 2 steps of batch 8)."
        in (tmp_path / "long" / "report.md").read_text()
    )

    trained.clear()  # experts given more steps too: nothing of the short study fits
    with pytest.raises(ValueError, match=r"reuse: .* \(different max_steps\)"):
        run_study(
            model,
            *data,
            dataclasses.replace(short, max_steps=4),
            tmp_path / "all-long",
            progress=False,
            reuse=[tmp_path / "short"],
        )
    with pytest.raises(ValueError, match=r"ran at lr 0\.001, not one of this study's \[0\.002\]"):
        run_study(
            model, *data, dataclasses.replace(longer, lr=2e-3), tmp_path / "x", reuse=[tmp_path / "short"]
        )


def test_a_routing_variant_retrains_only_the_generator(tmp_path: Path, monkeypatch) -> None:
    """Routing settings (sharpness, bases at the same emitted rank, training clusters) change nothing a
    static LoRA or an expert sees: a variant study takes their runs and trains only the mixture. Bases of
    another rank change only the one-basis static LoRA."""
    import dataclasses

    import adapter_service.training.evaluation as evaluation

    model = tiny_llama()
    data = (synthetic(36, 1), synthetic(12, 2), synthetic(12, 3))
    mixture = quick_config(network="mixture", bases=3, rank=2, experts=True, train_policy=FixedK(6))
    big = ("static-big",)  # its rank follows the generator's parameter count: always retrained
    run_study(model, *data, mixture, tmp_path / "soft", progress=False, skip=big)

    trained = []
    real_train = evaluation.train
    monkeypatch.setattr(
        evaluation, "train", lambda *a, **k: trained.append(type(a[1]).__name__) or real_train(*a, **k)
    )
    sharp = dataclasses.replace(mixture, routing_sharpness=2.0, train_policy=FixedK(3))
    run_study(model, *data, sharp, tmp_path / "sharp", progress=False, skip=big, reuse=[tmp_path / "soft"])
    assert trained == ["MixtureHyperNetwork"]
    for name in ("static", "static-basis", "experts"):
        path = f"runs/{name}-seed0.json"
        assert (tmp_path / "sharp" / path).read_text() == (tmp_path / "soft" / path).read_text()

    # Six bases of rank 1: the same emitted rank 6, so the static LoRA of that rank and the experts (who
    # share it out over the three labels) fit; the static LoRA of one basis's rank does not.
    trained.clear()
    finer = dataclasses.replace(mixture, bases=6, rank=1)
    run_study(model, *data, finer, tmp_path / "finer", progress=False, skip=big, reuse=[tmp_path / "soft"])
    assert sorted(trained) == ["MixtureHyperNetwork", "StaticLoRA"]
    for name in ("static", "experts"):
        path = f"runs/{name}-seed0.json"
        assert (tmp_path / "finer" / path).read_text() == (tmp_path / "soft" / path).read_text()
    runs = {
        n: json.loads((tmp_path / "finer" / f"runs/{n}-seed0.json").read_text())
        for n in ("static", "experts")
    }
    assert runs["experts"]["params"] == runs["static"]["params"]  # 3 x rank 2 = rank 6: equal parameters


def test_the_label_oracle_routes_the_generator_on_one_hot_domains_only(tmp_path: Path, monkeypatch) -> None:
    """`oracle_statistic` (a diagnostic) gives the generator each prompt's label as its statistic, so the
    test grouping is perfect; the baselines never see a statistic, so a study reusing them trains only
    the generator. Unlabelled data is refused by name."""
    import dataclasses

    import adapter_service.training.evaluation as evaluation
    from adapter_service.training.report import write_report

    model = tiny_llama()
    data = (synthetic(36, 1), synthetic(12, 2), synthetic(12, 3))
    mixture = quick_config(network="mixture", bases=3, rank=2, experts=True, train_policy=FixedK(6))
    big = ("static-big",)
    plain = run_study(model, *data, mixture, tmp_path / "plain", progress=False, skip=big)

    seen = []
    real_train = evaluation.train

    def spy(*args, **kwargs):
        network, examples, statistics = args[1], args[4], args[-1]
        if type(network).__name__ == "MixtureHyperNetwork":
            seen.append(statistics([e.prompt for e in examples]))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(evaluation, "train", spy)
    oracle = dataclasses.replace(mixture, oracle_statistic=True)
    report = run_study(
        model, *data, oracle, tmp_path / "oracle", progress=False, skip=big, reuse=[tmp_path / "plain"]
    )
    labels = sorted({e.label for e in data[0]})
    (rows,) = seen  # only the generator trained
    assert rows.shape[1] == model.config.hidden_size
    assert torch.equal(rows.argmax(1), torch.tensor([labels.index(e.label) for e in data[0]]))
    assert torch.equal(rows.sum(1), torch.ones(len(data[0])))
    assert report["grouping"]["knn_accuracy"] == 1.0 and report["oracle_statistic"]
    assert plain["grouping"]["knn_accuracy"] < 1.0  # the tiny model's embedding does not group perfectly
    for study, says in ((report, "each prompt's domain label"), (plain, "the statistic `embedding`")):
        (tmp_path / "md").mkdir(exist_ok=True)
        write_report(study, tmp_path / "md")
        assert f"routed on {says}" in (tmp_path / "md" / "report.md").read_text()
    for name in ("static", "experts"):
        path = f"runs/{name}-seed0.json"
        assert (tmp_path / "oracle" / path).read_text() == (tmp_path / "plain" / path).read_text()
    unlabelled = [dataclasses.replace(e, label=None) for e in data[2]]
    with pytest.raises(ValueError, match="oracle_statistic: expected labelled examples"):
        run_study(model, data[0], data[1], unlabelled, oracle, tmp_path / "none", progress=False, skip=big)


def test_a_study_killed_mid_run_resumes_that_run_where_it_stopped(tmp_path: Path, monkeypatch) -> None:
    """A study spans jobs and machines: a run killed between validations resumes from its last
    checkpoint (each expert from its own) and ends exactly as an uninterrupted run does; its time is
    then not recorded rather than understated, and no partial state is left behind."""
    from adapter_service.training import checkpoint

    config = quick_config(max_steps=4, experts=True)
    data = (synthetic(36, 1), synthetic(12, 2), synthetic(12, 3))
    whole = run_study(tiny_llama(), *data, config, tmp_path / "whole", progress=False)

    save = checkpoint.save
    saves = []

    def killed_at_the_first_validation(directory, state, run):
        path = save(directory, state, run)
        saves.append(state.step)
        if len(saves) == 1:
            raise KeyboardInterrupt("killed")
        return path

    monkeypatch.setattr(checkpoint, "save", killed_at_the_first_validation)
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_llama(), *data, config, tmp_path / "cut", progress=False)
    runs = tmp_path / "cut" / "runs"
    assert saves == [2] and any((runs / "partial").rglob("checkpoint.pt"))  # cut at step 2 of 4
    load = checkpoint.load
    resumed_at = []

    def spied(*args):
        state = load(*args)
        if state is not None:
            resumed_at.append(state.step)
        return state

    monkeypatch.setattr(checkpoint, "load", spied)
    resumed = run_study(tiny_llama(), *data, config, tmp_path / "cut", progress=False)
    assert resumed_at == [2]  # resumed from step 2, not restarted
    for name, entry in whole["methods"].items():
        assert resumed["methods"][name]["per_seed"] == pytest.approx(entry["per_seed"], abs=1e-6), name
    assert not (runs / "partial").exists()
    assert resumed["run_seconds"]["untimed"] == 1  # the one run that was cut and resumed
