"""Training core on tiny models: zero start, loss goes down, no leakage, train/serve parity."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from adapter_service.client import AdapterClient
from adapter_service.core.clustering import FixedK, PerRequest
from adapter_service.training.export import export_artifact, plan_export
from adapter_service.training.hypernetwork import HyperNetwork, build_network
from adapter_service.training.trainer import (
    DeltaApplier,
    Example,
    StaticLoRA,
    TrainConfig,
    adapters_for_batch,
    batch_statistics,
    batches,
    continuation_nll,
    lr_factor,
    mean_nll,
    train,
)
from conftest import start_server, tiny_gpt2, tiny_llama, word_tokenizer
from samples import C, synthetic


def setup(init: str = "zero", seed: int = 0):
    model = tiny_llama()
    plan = plan_export(model, ["q_proj", "v_proj"], rank=4, init=init, hidden=32)
    torch.manual_seed(seed)
    network = HyperNetwork(plan.hypernetwork_config)
    return model, plan, network


def fit(model, plan, network, config: TrainConfig, train_data=None, val_data=None, **kwargs):
    """train() on the plan's targets, with the synthetic splits most tests use."""
    return train(
        model,
        network,
        plan.group_modules,
        plan.manifest_base["scaling"],
        synthetic(36, 1) if train_data is None else train_data,
        synthetic(12, 2) if val_data is None else val_data,
        config,
        progress=False,
        **kwargs,
    )


def test_adapters_start_at_zero_so_training_starts_at_the_base_model() -> None:
    model, plan, network = setup("zero")
    applier = DeltaApplier(
        model, [n for ms in plan.group_modules.values() for n in ms], plan.manifest_base["scaling"]
    )
    data = synthetic(12, 0)
    with_net, _ = mean_nll(model, applier, network, plan.group_modules, data, FixedK(3), 6)
    base, _ = mean_nll(model, applier, None, plan.group_modules, data, FixedK(3), 6)
    assert np.array_equal(with_net, base)
    static = StaticLoRA(plan.hypernetwork_config)
    with_static, _ = mean_nll(model, applier, static, plan.group_modules, data, FixedK(3), 6)
    assert np.array_equal(with_static, base)


@pytest.mark.parametrize("kind", ["hyper", "static", "mixture"])
def test_training_lowers_the_validation_loss(kind: str) -> None:
    model, plan, network = setup("zero")
    if kind == "static":
        network = StaticLoRA(plan.hypernetwork_config)
    if kind == "mixture":
        plan = plan_export(model, ["q_proj", "v_proj"], rank=4, hidden=32, kind="mixture", bases=2)
        network = build_network(plan.hypernetwork_config)
    train_data, val_data = synthetic(60, 1), synthetic(18, 2)
    config = TrainConfig(policy=FixedK(3), batch_size=12, lr=1e-2, max_steps=40, eval_every=10, patience=10)
    applier = DeltaApplier(
        model, [n for ms in plan.group_modules.values() for n in ms], plan.manifest_base["scaling"]
    )
    before, length = mean_nll(model, applier, network, plan.group_modules, val_data, FixedK(3), 12)
    applier.remove()
    result = fit(model, plan, network, config, train_data, val_data)
    after = result.best_validation_nll
    assert after < 0.95 * before.sum() / (len(before) * length)  # at least 5% lower per token
    assert result.history[0]["validation_nll"] > after
    assert not any(m._forward_hooks for m in model.modules())  # training leaves the model as it was


def test_lr_factor_warms_up_then_holds_or_decays_to_zero() -> None:
    assert [lr_factor(s, "constant", 4, 20) for s in (1, 2, 4, 5, 20)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, "cosine", 4, 20) for s in range(1, 21)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(cosine[3:]))  # non-increasing after warm-up
    assert cosine[11] == pytest.approx(0.5)  # half-way through the decay
    assert cosine[-1] == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(1, "constant", 0, 20) == 1.0
    with pytest.raises(ValueError, match="schedule: expected one of constant, cosine, got 'step'"):
        lr_factor(1, "step", 0, 20)


def test_training_clips_the_gradient_and_follows_the_schedule(monkeypatch) -> None:
    """Every step clips the generator's gradient to the configured norm and sets the scheduled rate."""
    model, plan, network = setup("zero")
    norms: list[float] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = real_clip(parameters, max_norm, *args, **kwargs)
        after = torch.norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        norms.append(float(after))
        assert max_norm == 0.05
        return total

    rates: list[float] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    config = TrainConfig(
        policy=FixedK(3),
        batch_size=12,
        lr=1e-2,
        max_steps=6,
        eval_every=3,
        patience=10,
        schedule="cosine",
        warmup_steps=2,
        clip_grad_norm=0.05,
    )
    fit(model, plan, network, config)
    assert len(norms) == 6 and max(norms) <= 0.05 * (1 + 1e-5)
    assert rates == pytest.approx([1e-2 * lr_factor(s, "cosine", 2, 6) for s in range(1, 7)])


def test_training_refuses_a_bad_schedule_or_clip_before_it_starts() -> None:
    model, plan, network = setup("zero")
    for bad, match in (
        ({"schedule": "linear"}, "schedule: expected one of constant, cosine"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm: expected a positive number"),
    ):
        config = TrainConfig(policy=FixedK(3), batch_size=12, max_steps=2, **bad)
        with pytest.raises(ValueError, match=match):
            fit(model, plan, network, config)


def test_changing_only_the_continuation_does_not_change_the_adapter() -> None:
    model, plan, network = setup("random")
    data = synthetic(9, 3)
    changed = [Example(e.prompt, tuple(reversed(e.continuation)), e.label, e.doc_id) for e in data]
    adapters = []
    for examples in (data, changed):
        stats = batch_statistics(model, torch.tensor([e.prompt for e in examples]))
        adapters.append(adapters_for_batch(network, plan.group_modules, stats, FixedK(3)))
    assert np.array_equal(adapters[0].assignments, adapters[1].assignments)
    for name, (a, b) in adapters[0].rows.items():
        assert torch.equal(a, adapters[1].rows[name][0]) and torch.equal(b, adapters[1].rows[name][1])


def test_statistic_is_the_plugins_function() -> None:
    import adapter_service.training.trainer as training
    import chameleon_torch.model as plugin

    assert training.compute_statistic is plugin.compute_statistic  # one function, every kind


@pytest.mark.parametrize(
    ("statistic", "targets", "seed", "kind"),
    [
        ("embedding", ["q_proj", "v_proj"], 4, "full"),
        ("hidden:1", ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"], 6, "full"),
        ("embedding", ["q_proj", "v_proj"], 4, "mixture"),
        ("hidden:2", ["q_proj", "v_proj"], 7, "mixture"),  # targets before L: a separate partial pass
        ("embedding", ["q_proj", "v_proj"], 8, "mixture:table"),  # one learned row of weights per prototype
        ("embedding", ["q_proj", "v_proj"], 9, "mixture:classifier"),  # labels at training time only
        ("embedding", ["q_proj", "v_proj"], 10, "mixture:predicted-label"),
        ("encoder", ["q_proj", "v_proj"], 5, "full"),
        ("encoder", ["q_proj", "v_proj"], 5, "mixture"),
    ],
)
def test_training_application_equals_the_plugin_with_the_exported_artifact(
    statistic: str, targets: list[str], seed: int, kind: str, tmp_path: Path, encoder_dir: Path
) -> None:
    """Train/serve parity, for every statistic kind: the differentiable training hooks and the served
    path (ONNX in the sidecar, k-means in the sidecar, chameleon_torch's stacked hooks, the statistic
    computed by the plugin from the prompt through the one shared function) give the same logits.
    The sentence encoder decodes prompts with the model's tokenizer on both sides."""
    from chameleon_torch import PluginConfig, attach

    model, tokenizer = tiny_llama(), word_tokenizer()
    if statistic == "encoder":
        statistic = f"encoder:{encoder_dir}"
    kind, _, routing = kind.partition(":")
    plan = plan_export(
        model,
        targets,
        rank=4,
        init="random",
        hidden=32,
        statistic=statistic,
        kind=kind,
        bases=2,
        routing=routing or "distance",
        labels=("d0", "d1", "d2") if routing in ("classifier", "predicted-label") else (),
    )
    spec = plan.manifest_base["statistic"]
    torch.manual_seed(seed)
    network = build_network(plan.hypernetwork_config).eval()
    if kind == "mixture":  # fitted to some statistics, so the routing differs between clusters
        fit = synthetic(30, 9)
        stats = batch_statistics(model, torch.tensor([e.prompt for e in fit]), spec, tokenizer)
        network.fit_statistics(stats, labels=[e.label for e in fit])
    artifact = export_artifact(network, plan, tmp_path / "artifact")
    data = synthetic(9, 5)
    prompts = torch.tensor([e.prompt for e in data])
    tokens = torch.tensor([e.prompt + e.continuation for e in data])
    names = [n for ms in plan.group_modules.values() for n in ms]
    applier = DeltaApplier(model, names, plan.manifest_base["scaling"])
    with torch.no_grad():
        stats = batch_statistics(model, prompts, spec, tokenizer)
        if statistic != "embedding":  # really another statistic
            assert stats.shape != (9, 64) or not torch.allclose(stats, batch_statistics(model, prompts))
        # a predicted-label artifact is served grouped by label: per request, as it trains
        policy = PerRequest() if routing == "predicted-label" else FixedK(3)
        adapters = adapters_for_batch(network, plan.group_modules, stats, policy)
        applier.rows = adapters.rows
        trained = model(input_ids=tokens).logits
        applier.rows = None
    applier.remove()
    server = start_server(artifact.path)
    try:
        handle = attach(
            model,
            AdapterClient(server.address, timeout=10),
            PluginConfig(policy=FixedK(3), wire_dtype="float32", deadline_s=10),
            tokenizer=tokenizer,
        )
        with torch.no_grad(), handle.adapt(prompts) as batch:  # statistic from the prompt only
            served = model(input_ids=tokens).logits
        handle.detach()
    finally:
        server.stop()
    assert batch.adapted
    if routing == "predicted-label":  # the sidecar groups by predicted label; each row's adapter is equal
        assert batch.k <= 3
    else:
        assert np.array_equal(batch.assignments, adapters.assignments)
    assert float((served - trained).abs().max() / trained.abs().max()) <= 1e-5


def test_static_lora_exports_and_ignores_its_input(tmp_path: Path) -> None:
    from adapter_service.serving.runtime import HyperNetworkRuntime

    _, plan, _ = setup("zero")
    static = StaticLoRA(plan.hypernetwork_config)
    with torch.no_grad():
        for b in static.b:
            b.normal_()
    runtime = HyperNetworkRuntime(export_artifact(static, plan, tmp_path / "static"))
    out = runtime.generate(np.random.default_rng(0).standard_normal((3, 64)).astype("f4"))
    for group in out.values():
        assert np.array_equal(group.b[0], group.b[2]) and np.abs(group.b).max() > 0


def test_batches_mixed_and_coherent() -> None:
    data = synthetic(30, 6)
    mixed = next(batches(data, 6, "mixed", random.Random(0)))
    assert len({e.label for e in mixed}) > 1
    coherent = [next(it) for it in [batches(data, 5, "coherent", random.Random(0))] for _ in range(4)]
    assert all(len({e.label for e in chunk}) == 1 for chunk in coherent)
    with pytest.raises(ValueError, match="batching"):
        next(batches(data, 5, "other", random.Random(0)))
    with pytest.raises(ValueError, match="label"):
        next(batches([Example((1,), (2,))] * 10, 5, "coherent", random.Random(0)))


def test_continuation_nll_scores_only_the_continuation() -> None:
    model, _, _ = setup()
    applier = DeltaApplier(model, [], 1.0)
    data = synthetic(3, 7)
    nll, length = continuation_nll(model, applier, data, None)
    assert length == C and nll.shape == (3,)
    changed_prompt_tail = [Example(e.prompt, (*e.continuation[:-1], 0), e.label) for e in data]
    nll2, _ = continuation_nll(model, applier, changed_prompt_tail, None)
    assert not torch.equal(nll, nll2)  # the last continuation token is scored


@pytest.mark.parametrize("targets", [["v_proj"], ["lm_head"], ["model.layers.1.self_attn.q_proj", "lm_head"]])
def test_prefix_cache_gives_the_same_nll_as_the_full_forward(targets: list[str]) -> None:
    from adapter_service.training.trainer import PrefixCache

    model = tiny_llama()
    plan = plan_export(model, targets, rank=4, init="random", hidden=16)
    torch.manual_seed(0)
    network = HyperNetwork(plan.hypernetwork_config).eval()
    names = [n for ms in plan.group_modules.values() for n in ms]
    first = PrefixCache.first_adapted_layer(model, names)
    assert first == {"v_proj": 0, "lm_head": 2}.get(targets[0], 1)
    prefix = PrefixCache(model, first)
    data = synthetic(12, 8)
    prefix.add(data, batch_size=5, progress=False)
    applier = DeltaApplier(model, names, plan.manifest_base["scaling"])
    full, _ = mean_nll(model, applier, network, plan.group_modules, data, FixedK(3), 6)
    cached, _ = mean_nll(model, applier, network, plan.group_modules, data, FixedK(3), 6, prefix=prefix)
    base_full, _ = mean_nll(model, applier, None, plan.group_modules, data, FixedK(3), 6)
    applier.remove()
    assert float(np.abs(cached - full).max() / np.abs(full).max()) <= 1e-5
    assert float(np.abs(full - base_full).max()) > 1e-3  # the adapters matter, so the check is not vacuous


def test_training_with_the_prefix_cache_matches_training_without() -> None:
    from adapter_service.training.trainer import PrefixCache

    results = []
    for use_cache in (False, True):
        model, plan, network = setup("zero")
        names = [n for ms in plan.group_modules.values() for n in ms]
        prefix = PrefixCache(model, PrefixCache.first_adapted_layer(model, names)) if use_cache else None
        config = TrainConfig(policy=FixedK(3), batch_size=12, lr=1e-2, max_steps=6, eval_every=3, patience=10)
        result = fit(model, plan, network, config, prefix=prefix)
        results.append([h["validation_nll"] for h in result.history])
    assert np.allclose(results[0], results[1], rtol=1e-4)


def test_prefix_cache_refuses_models_it_cannot_split() -> None:
    from adapter_service.training.trainer import PrefixCache

    with pytest.raises(ValueError, match="not a Llama-family model"):
        PrefixCache(tiny_gpt2(), 1)


def test_prefix_cache_for_targets_is_none_where_nothing_can_be_cached() -> None:
    from adapter_service.training.trainer import PrefixCache

    assert PrefixCache.for_targets(tiny_gpt2(), ["transformer.h.1.attn.c_attn"]) is None
    assert PrefixCache.for_targets(tiny_llama(), ["model.embed_tokens"]) is None
    assert PrefixCache.for_targets(tiny_llama(), ["model.layers.1.self_attn.v_proj"]).first_layer == 1


def test_plugin_refuses_a_statistic_it_cannot_compute(tmp_path: Path, encoder_dir: Path) -> None:
    import dataclasses

    from adapter_service.core.artifact import StatisticSpec
    from chameleon_torch import ManifestMismatch, check_model

    model = tiny_llama()
    artifact = export_artifact(*_fresh(model), tmp_path / "a")
    server = start_server(artifact.path)
    try:
        manifest = AdapterClient(server.address, timeout=10).manifest()
    finally:
        server.stop()
    check_model(model, manifest)  # the real one fits
    encoder, words = {"encoder": str(encoder_dir)}, word_tokenizer()
    check_model(
        model,
        dataclasses.replace(manifest, statistic=StatisticSpec("sentence_encoder", 32, params=encoder)),
        tokenizer=words,
    )
    for spec, tokenizer, message in (
        (StatisticSpec("tf_idf", 64), words, "'tf_idf' is not computed here"),
        (StatisticSpec("sentence_encoder", 32, params=encoder), None, r"attach\(\.\.\., tokenizer=\)"),
        (
            StatisticSpec("sentence_encoder", 64, params=encoder),
            words,
            "artifact expects 64, this plugin computes 32",
        ),
        (
            StatisticSpec("sentence_encoder", 32, params={"encoder": "/nowhere"}),
            words,
            "cannot load sentence encoder",
        ),
        (
            StatisticSpec("mean_hidden_state", 64, params={"layer": "5"}),
            words,
            r"expected 1..2 \(the model.s decoder layers\), got 5",
        ),
        (StatisticSpec("mean_input_embedding", 64, normalization="none"), words, "expected 'l2'"),
    ):
        with pytest.raises(ManifestMismatch, match=message):
            check_model(model, dataclasses.replace(manifest, statistic=spec), tokenizer=tokenizer)


def _fresh(model):
    plan = plan_export(model, ["v_proj"], rank=2, init="random", hidden=8)
    return HyperNetwork(plan.hypernetwork_config).eval(), plan


def test_statistic_cache_computes_each_prompt_once_and_never_for_a_static_lora(monkeypatch) -> None:
    import adapter_service.training.trainer as training

    model, plan, network = setup()
    calls = []
    real = training.batch_statistics
    monkeypatch.setattr(
        training, "batch_statistics", lambda m, p, s=None, t=None: calls.append(len(p)) or real(m, p, s, t)
    )
    cache = training.StatisticCache(model, None)
    data = synthetic(6, 0)
    prompts = [e.prompt for e in data]
    first = cache(prompts + prompts[:2], network)
    again = cache(prompts[::-1], network)
    assert calls == [6]  # distinct prompts, once
    torch.testing.assert_close(first[:6], batch_statistics(model, torch.tensor(prompts)))
    torch.testing.assert_close(again, first[:6].flip(0))
    static = cache([e.prompt for e in synthetic(4, 9)], StaticLoRA(plan.hypernetwork_config))
    assert calls == [6]  # never for the static LoRA, which ignores its input
    assert static.shape == (4, 64) and torch.all(static == 1)
