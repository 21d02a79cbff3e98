"""Artifacts: export parity with torch, dynamic K, zero init, target discovery, strict loading."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from adapter_service.core.artifact import ArtifactError, load_artifact
from adapter_service.models.spec import embedding_sha256, find_targets, fingerprint
from adapter_service.serving.runtime import HyperNetworkRuntime
from adapter_service.training.export import load_model, make_fresh_artifact, parity_error, plan_export
from adapter_service.training.hypernetwork import HyperNetwork
from conftest import tiny_gpt2, tiny_llama


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_onnx_matches_torch_for_several_k(tmp_path: Path) -> None:
    model = tiny_llama()
    plan = plan_export(model, ["q_proj", "v_proj"], rank=4, init="random")
    torch.manual_seed(3)
    network = HyperNetwork(plan.hypernetwork_config).eval()
    from adapter_service.training.export import export_artifact

    artifact = export_artifact(network, plan, tmp_path / "a")
    runtime = HyperNetworkRuntime(artifact)
    for k in (1, 2, 7, 16):
        centroids = torch.nn.functional.normalize(torch.randn(k, 64), dim=-1)
        with torch.no_grad():
            want = network(centroids)
        got = runtime.generate(centroids.numpy())
        for i, group in enumerate(artifact.manifest.groups):
            assert got[group.name].a.shape == (k, 2, 4, group.d_in)
            assert got[group.name].b.shape == (k, 2, group.d_out, 4)
            assert relative_error(got[group.name].a, want[2 * i].numpy()) <= 1e-5
            assert relative_error(got[group.name].b, want[2 * i + 1].numpy()) <= 1e-5
    assert artifact.manifest.hypernetwork["onnx_parity_max_rel_error"] <= 1e-5


def test_parity_check_catches_a_different_network() -> None:
    plan = plan_export(tiny_llama(), ["q_proj"], rank=2, init="random")
    from adapter_service.training.export import to_onnx

    torch.manual_seed(0)
    exported = HyperNetwork(plan.hypernetwork_config).eval()
    torch.manual_seed(1)
    other = HyperNetwork(plan.hypernetwork_config).eval()
    onnx_bytes = to_onnx(exported)
    assert parity_error(exported, onnx_bytes) <= 1e-5
    assert parity_error(other, onnx_bytes) > 1e-2


def test_zero_init_emits_zero_deltas(tmp_path: Path) -> None:
    artifact = make_fresh_artifact(tiny_llama(), ["q_proj", "v_proj"], 4, tmp_path, init="zero")
    out = HyperNetworkRuntime(artifact).generate(
        np.random.default_rng(0).standard_normal((3, 64)).astype("f4")
    )
    for group in out.values():
        assert np.all(group.b == 0)
        assert np.abs(group.a).max() > 0  # A is live, so training can move B


def test_manifest_describes_model_and_targets(artifact_dir: Path, llama_dir: Path) -> None:
    m = load_artifact(artifact_dir).manifest
    assert m.base_model.architecture == "LlamaForCausalLM"
    assert (m.base_model.hidden_size, m.base_model.vocab_size, m.base_model.num_layers) == (64, 256, 2)
    model = load_model(llama_dir)
    assert m.base_model.weights_sha256 == embedding_sha256(model.get_input_embeddings().weight)
    assert m.statistic.kind == "mean_input_embedding" and m.statistic.dim == 64
    assert [t[0] for t in m.targets] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert {(t[1], t[2]) for t in m.targets} == {(64, 64), (64, 32)}
    assert m.rank == 4 and m.scaling == 2.0


def test_config_only_model_has_no_weights_hash(tmp_path: Path) -> None:
    config = Path(__file__).parents[2] / "adapter_service" / "data" / "smollm2-135m-config.json"
    model = load_model(config)
    fp = fingerprint(model)
    assert (fp.hidden_size, fp.vocab_size, fp.num_layers, fp.weights_sha256) == (576, 49152, 30, "")
    targets = find_targets(model, ["q_proj", "v_proj"])
    assert len(targets) == 60
    assert {(t.d_in, t.d_out) for t in targets} == {(576, 576), (576, 192)}


def test_gpt2_conv1d_targets_are_found() -> None:
    targets = find_targets(tiny_gpt2(), ["c_attn", "transformer.h.*.mlp.c_fc"])
    assert [(t.name, t.d_in, t.d_out) for t in targets] == [
        ("transformer.h.0.attn.c_attn", 48, 144),
        ("transformer.h.0.mlp.c_fc", 48, 192),
        ("transformer.h.1.attn.c_attn", 48, 144),
        ("transformer.h.1.mlp.c_fc", 48, 192),
    ]


def test_unknown_target_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"targets: \['q_prj'\] matched no nn.Linear"):
        find_targets(tiny_llama(), ["q_proj", "q_prj"])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_load_refuses_missing_corrupt_and_mismatched(artifact_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope")

    no_onnx = _copy(artifact_dir, tmp_path / "no_onnx")
    (no_onnx / "hypernetwork.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"has no hypernetwork\.onnx"):
        load_artifact(no_onnx)

    flipped = _copy(artifact_dir, tmp_path / "flipped")
    data = bytearray((flipped / "hypernetwork.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / "hypernetwork.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the manifest's hypernetwork_sha256"):
        load_artifact(flipped)

    bad_json = _copy(artifact_dir, tmp_path / "bad_json")
    (bad_json / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(bad_json)

    bad_field = _copy(artifact_dir, tmp_path / "bad_field")
    manifest = json.loads((bad_field / "manifest.json").read_text())
    manifest["rank"] = -4
    (bad_field / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="field 'rank': expected a positive integer"):
        load_artifact(bad_field)


def test_garbage_onnx_with_matching_hash_is_refused_by_runtime(artifact_dir: Path, tmp_path: Path) -> None:
    import hashlib

    art = _copy(artifact_dir, tmp_path / "garbage")
    garbage = b"this is not an onnx model"
    (art / "hypernetwork.onnx").write_bytes(garbage)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["hypernetwork_sha256"] = hashlib.sha256(garbage).hexdigest()
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="onnxruntime cannot load"):
        HyperNetworkRuntime(load_artifact(art))


def test_export_is_reproducible_and_carries_no_file_paths() -> None:
    import onnx

    from adapter_service.training.export import to_onnx

    plan = plan_export(tiny_llama(), ["q_proj"], rank=2, init="random")
    exports = []
    for _ in range(2):
        torch.manual_seed(0)
        exports.append(to_onnx(HyperNetwork(plan.hypernetwork_config).eval()))
    assert exports[0] == exports[1]
    model = onnx.load_from_string(exports[0])
    assert __file__.rsplit("/", 3)[0] not in str(model)
    assert not any(p.key == "pkg.torch.onnx.stack_trace" for n in model.graph.node for p in n.metadata_props)


def test_network_emitting_nan_is_not_exported(tmp_path: Path) -> None:
    from adapter_service.training.export import ExportError, export_artifact

    plan = plan_export(tiny_llama(), ["q_proj"], rank=2, init="random")
    network = HyperNetwork(plan.hypernetwork_config).eval()
    with torch.no_grad():
        network.heads_b[0].bias[0] = float("nan")
    with pytest.raises(ExportError, match="artifact not written"):
        export_artifact(network, plan, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


@pytest.mark.parametrize("kind", ["hyper", "static"])
def test_delta_norm_cap_holds_in_torch_and_in_the_exported_graph(kind: str, tmp_path: Path) -> None:
    """||s B A||_F <= c ||W||_F for every cluster and module, enforced inside the ONNX graph too; a
    cap that does not bind changes nothing."""
    from adapter_service.training.export import export_artifact
    from adapter_service.training.trainer import StaticLoRA

    model = tiny_llama()
    cap = 0.01
    plan = plan_export(model, ["q_proj", "v_proj"], rank=4, init="random", max_delta_norm=cap)
    loose = plan_export(model, ["q_proj", "v_proj"], rank=4, init="random", max_delta_norm=1e6)
    free = plan_export(model, ["q_proj", "v_proj"], rank=4, init="random")
    make = HyperNetwork if kind == "hyper" else StaticLoRA

    def build(p):
        torch.manual_seed(3)
        network = make(p.hypernetwork_config).eval()
        if kind == "static":  # B starts at zero in a static LoRA; give it something to cap
            with torch.no_grad():
                for b in network.b:
                    b.normal_(0, 1.0)
        return network

    capped, unbound, uncapped = build(plan), build(loose), build(free)
    centroids = torch.nn.functional.normalize(torch.randn(5, 64), dim=-1)
    with torch.no_grad():
        outs, outs_loose, outs_free = capped(centroids), unbound(centroids), uncapped(centroids)
    s = plan.manifest_base["scaling"]
    binding = 0
    for i, modules in enumerate(plan.group_modules.values()):
        a, b = outs[2 * i], outs[2 * i + 1]
        for layer, module in enumerate(modules):
            w = model.get_submodule(module).weight.norm()
            norms = (s * (b[:, layer] @ a[:, layer])).flatten(1).norm(dim=1)
            assert torch.all(norms <= cap * w * (1 + 1e-5))
            free_norms = (
                (s * (outs_free[2 * i + 1][:, layer] @ outs_free[2 * i][:, layer])).flatten(1).norm(dim=1)
            )
            binding += int((free_norms > cap * w).sum())
        torch.testing.assert_close(outs_loose[2 * i + 1], outs_free[2 * i + 1], rtol=1e-6, atol=0)
    assert binding > 0  # the cap was exercised
    artifact = export_artifact(capped, plan, tmp_path / kind)
    assert artifact.manifest.hypernetwork["config"]["max_delta_norm"] == cap
    got = HyperNetworkRuntime(artifact).generate(centroids.numpy())
    for i, group in enumerate(artifact.manifest.groups):
        assert relative_error(got[group.name].b, outs[2 * i + 1].numpy()) <= 1e-5


def test_delta_norm_cap_trains_from_zero_and_needs_weights(tmp_path: Path) -> None:
    plan = plan_export(tiny_llama(), ["v_proj"], rank=2, max_delta_norm=0.05)
    network = HyperNetwork(plan.hypernetwork_config)
    outs = network(torch.nn.functional.normalize(torch.randn(3, 64), dim=-1))
    (outs[0].sum() + outs[1].sum()).backward()
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)  # B = 0 is where training starts
    assert network.heads_b[0].weight.grad.abs().max() > 0
    from adapter_service.training.hypernetwork import HyperNetworkConfig

    assert HyperNetworkConfig.from_json(plan.hypernetwork_config.to_json()) == plan.hypernetwork_config
    with pytest.raises(ValueError, match="max_delta_norm"):
        plan_export(tiny_llama(), ["v_proj"], rank=2, max_delta_norm=-1.0)
    meta = load_model(Path(__file__).parents[2] / "adapter_service" / "data" / "smollm2-135m-config.json")
    with pytest.raises(ValueError, match="max_delta_norm: the cap is relative to the base weights"):
        plan_export(meta, ["v_proj"], rank=2, max_delta_norm=0.05)


def test_hidden_statistic_is_declared_and_its_layer_checked(tmp_path: Path) -> None:
    """Targets at or before the statistic's layer are allowed: the statistic is then a separate pass of
    the base model's first L layers (train/serve parity for that case is in test_training)."""
    from adapter_service.client import AdapterClient
    from conftest import start_server

    model = tiny_llama()
    early = plan_export(model, ["v_proj"], rank=2, statistic="hidden:2")
    assert early.manifest_base["statistic"].params == {"layer": "2"}
    assert early.group_modules["v_proj"] == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    with pytest.raises(
        ValueError, match=r"statistic.params.layer: expected 1..2 \(the model's decoder layers\), got 3"
    ):
        plan_export(model, ["lm_head"], rank=2, statistic="hidden:3")
    artifact = make_fresh_artifact(model, ["model.layers.1.self_attn.v_proj"], 2, tmp_path / "a")
    assert artifact.manifest.statistic.kind == "mean_input_embedding"
    from adapter_service.training.export import export_artifact

    plan = plan_export(model, ["model.layers.1.self_attn.v_proj"], rank=2, statistic="hidden:1")
    written = export_artifact(HyperNetwork(plan.hypernetwork_config), plan, tmp_path / "h")
    stat = load_artifact(written.path).manifest.statistic
    assert (stat.kind, stat.params, stat.dim) == ("mean_hidden_state", {"layer": "1"}, 64)
    server = start_server(written.path)
    try:
        served = AdapterClient(server.address, timeout=10).manifest().statistic
    finally:
        server.stop()
    assert (served.kind, dict(served.params)) == ("mean_hidden_state", {"layer": "1"})


def test_sentence_encoder_statistic_is_declared_with_the_encoders_width(
    tmp_path: Path, encoder_dir: Path
) -> None:
    """The manifest carries the encoder (as named), its token budget and its width, which is also the
    hyper-network's input: the sidecar then validates statistics against the encoder, not the model.
    Any target may be adapted (the statistic reads no decoder layer)."""
    from adapter_service.client import AdapterClient, AdapterServiceError
    from conftest import start_server

    model = tiny_llama()
    plan = plan_export(model, ["q_proj", "v_proj"], rank=2, statistic=f"encoder:{encoder_dir}")
    assert plan.hypernetwork_config.stat_dim == 32
    written = make_fresh_artifact(
        model, ["q_proj", "v_proj"], 2, tmp_path / "e", statistic=f"encoder:{encoder_dir}"
    )
    stat = load_artifact(written.path).manifest.statistic
    assert (stat.kind, stat.dim) == ("sentence_encoder", 32)
    assert stat.params == {"encoder": str(encoder_dir), "max_length": "128"}
    server = start_server(written.path)
    try:
        client = AdapterClient(server.address, timeout=10)
        assert client.manifest().statistic.kind == "sentence_encoder"
        assert client.adapt(np.ones((2, 32), np.float32)).k >= 1
        with pytest.raises(AdapterServiceError, match=r"D = 64; expected D = 32 \(sentence_encoder of /"):
            client.adapt(np.ones((2, 64), np.float32))
    finally:
        server.stop()
