"""The example server with the plugin attached to a real sidecar process, called by InferenceClient."""

from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from huggingface_hub import InferenceClient

from adapter_service.client import AdapterClient, ClientSecurity
from adapter_service.demo.sidecar import SidecarProcess
from adapter_service.training.export import make_fresh_artifact
from chameleon_model_server.http_server import (
    ModelServer,
    _attach,
    build_parser,
    main,
    serve,
    sidecar_security,
)
from chameleon_torch import PluginConfig, attach
from samples import PROMPTS, tiny_model, tiny_tokenizer

NEW_TOKENS = 8


def generate_all(
    server: ModelServer, prompts: list[str], concurrent: bool, stream: bool = False
) -> list[str]:
    client = InferenceClient(base_url=server.url, timeout=120)

    def one(prompt: str) -> str:
        if stream:  # the last event carries the whole text (token texts hold back split characters)
            events = list(
                client.text_generation(prompt, max_new_tokens=NEW_TOKENS, stream=True, details=True)
            )
            return events[-1].generated_text
        return client.text_generation(prompt, max_new_tokens=NEW_TOKENS)

    if not concurrent:
        return [one(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def metric(server: ModelServer, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"{server.url}/metrics", timeout=30).read().decode()
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{{{labels}}} not in /metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def base_outputs(tokenizer) -> list[str]:
    server = serve(tiny_model(tokenizer), tokenizer, port=0, batch_window_ms=50)
    try:
        return generate_all(server, PROMPTS, concurrent=False)
    finally:
        server.shutdown(grace=10)


def _adapted_server(tokenizer, artifact: Path, sidecar: SidecarProcess) -> ModelServer:
    model = tiny_model(tokenizer)
    handle = attach(model, AdapterClient(sidecar.address, timeout=5), PluginConfig(deadline_s=5))
    return serve(model, tokenizer, port=0, handle=handle, batch_window_ms=300)


def test_concurrent_clients_through_the_adapter_path_equal_one_by_one(
    tokenizer, base_outputs, tmp_path
) -> None:
    """With a zero-delta artifact the adapter path runs in full (statistic, Adapt, hooks with row
    masks) and must change nothing: concurrent, one-by-one and base outputs all agree exactly."""
    artifact = make_fresh_artifact(
        tiny_model(tokenizer), ["q_proj", "v_proj"], 4, tmp_path / "zero", init="zero"
    )
    with SidecarProcess(artifact.path) as sidecar:
        server = _adapted_server(tokenizer, artifact.path, sidecar)
        try:
            together = generate_all(server, PROMPTS, concurrent=True)
            streamed = generate_all(server, PROMPTS, concurrent=True, stream=True)
            alone = generate_all(server, PROMPTS, concurrent=False)
            assert together == alone == streamed == base_outputs
            assert metric(server, "chameleon_plugin_batches_total", 'outcome="adapted"') >= 3
            assert metric(server, "chameleon_plugin_batches_total", 'outcome="fallback"') == 0
        finally:
            server.shutdown(grace=10)


def test_requests_fall_back_to_the_base_model_when_the_sidecar_dies(
    tokenizer, base_outputs, tmp_path
) -> None:
    artifact = make_fresh_artifact(
        tiny_model(tokenizer), ["q_proj", "v_proj"], 4, tmp_path / "random", init="random", seed=3
    )
    sidecar = SidecarProcess(artifact.path)
    server = _adapted_server(tokenizer, artifact.path, sidecar)
    try:
        adapted = generate_all(server, PROMPTS, concurrent=True)
        assert all(adapted)
        assert metric(server, "chameleon_plugin_batches_total", 'outcome="adapted"') >= 1
        client = InferenceClient(base_url=server.url, timeout=120)
        facts = client.text_generation(PROMPTS[0], max_new_tokens=2, details=True).details.chameleon
        assert facts["adapted"] is True and facts["fallback_reason"] is None
        assert facts["batch_size"] == 1 and facts["k"] == 1 and facts["cluster"] == 0 and facts["batch"] >= 1
        sidecar.kill()
        after = generate_all(server, PROMPTS, concurrent=True)
        after_streamed = generate_all(server, PROMPTS[:2], concurrent=True, stream=True)
        assert after == base_outputs
        assert after_streamed == base_outputs[:2]
        assert metric(server, "chameleon_plugin_fallbacks_total", 'reason="unavailable"') >= 2
        facts = client.text_generation(PROMPTS[0], max_new_tokens=2, details=True).details.chameleon
        assert facts["adapted"] is False and facts["fallback_reason"] == "unavailable"
        assert facts["cluster"] is None
        last = list(client.text_generation(PROMPTS[0], max_new_tokens=2, stream=True, details=True))[-1]
        assert last.details.chameleon["fallback_reason"] == "unavailable"
    finally:
        server.shutdown(grace=10)
        sidecar.stop()


# -- security towards the sidecar (serve-model's --sidecar-* flags) --------------------------------


def _security_args(*flags: str):
    return build_parser().parse_args(["--sidecar", "127.0.0.1:1", *flags])


def test_sidecar_security_from_flags_and_variables(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    assert sidecar_security(_security_args(), environ={}) is None
    from_env = sidecar_security(_security_args(), environ={"CHAMELEON_AUTH_TOKEN_FILE": str(token)})
    assert isinstance(from_env, ClientSecurity) and from_env.token_file == str(token)
    from_flag = sidecar_security(_security_args("--sidecar-token-file", str(token)), environ={})
    assert from_flag.token_file == str(token) and from_flag.metadata() == (("authorization", "Bearer t0ken"),)
    # a flag overrides its variable; the other variables still apply, and errors name flag and variable
    with pytest.raises(ValueError, match=re.escape("--sidecar-tls-cert (or $CHAMELEON_TLS_CERT)")):
        sidecar_security(
            _security_args("--sidecar-token-file", str(token)),
            environ={"CHAMELEON_TLS_CERT": str(tmp_path / "missing.pem")},
        )
    with pytest.raises(ValueError, match="CHAMELEON_AUTH_TOKEN_FILE"):
        sidecar_security(_security_args(), environ={"CHAMELEON_AUTH_TOKEN_FILE": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="--sidecar-tls-server-name"):
        sidecar_security(_security_args("--sidecar-tls-server-name", "sidecar.test"), environ={})


def test_serve_model_refuses_bad_security_files_before_loading(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    assert main(["--model", missing, "--sidecar", "127.0.0.1:1", "--sidecar-token-file", missing]) == 2
    assert main(["--model", missing, "--api-key-file", missing]) == 2


def _adapted(model, tokenizer, handle) -> bool:
    """Whether one request through a server with `handle` ran with adapters (a None handle: no)."""
    if handle is None:
        return False
    server = serve(model, tokenizer, port=0, handle=handle, batch_window_ms=0)
    try:
        client = InferenceClient(base_url=server.url, timeout=120)
        details = client.text_generation(PROMPTS[0], max_new_tokens=2, details=True).details
        return bool(details.chameleon["adapted"])
    finally:
        server.shutdown(grace=10)
        handle.detach()


def test_attach_with_a_token_protected_sidecar(tokenizer, tmp_path: Path) -> None:
    """The token from --sidecar-token-file reaches the sidecar: with it batches are adapted; without it
    the server serves the base model."""
    token = tmp_path / "token"
    token.write_text("t0ken-for-the-sidecar\n")
    token.chmod(0o600)
    artifact = make_fresh_artifact(
        tiny_model(tokenizer), ["q_proj", "v_proj"], 4, tmp_path / "zero", init="zero"
    )
    with SidecarProcess(artifact.path, extra_args=["--auth-token-file", str(token)]) as sidecar:
        model = tiny_model(tokenizer)
        assert not _adapted(model, tokenizer, _attach(model, tokenizer, sidecar.address, 5.0))
        security = sidecar_security(_security_args("--sidecar-token-file", str(token)), environ={})
        handle = _attach(model, tokenizer, sidecar.address, 5.0, security=security)
        assert handle is not None and handle.client.security is security
        assert _adapted(model, tokenizer, handle)
