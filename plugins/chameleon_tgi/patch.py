"""Check that this TGI is the tested one, and has every name the plugin touches; then wrap them.

TGI's Python package reports "2.0.5-dev0" whatever the release, and the 3.3.7 image's launcher reports
"3.3.6-dev0" (its Cargo version was not bumped), so neither can tell releases apart. The version is
therefore recognised by the sha256 of the ten server source files the plugin depends on, as published
in the v3.3.7 tag (they are identical in 3.3.5 and 3.3.6). Other sources are refused unless
CHAMELEON_TGI_ALLOW_UNTESTED=1; a missing name or a changed signature is refused always, with the list.
Only the names of design 1 (TGI_INTERNALS.md, section 5) are patched: `get_model_with_lora_adapters`,
`FlashCausalLM.generate_token` and `.warmup`, `FlashCausalLMBatch.filter`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from chameleon_tgi import TESTED_TGI_VERSION
from chameleon_tgi.config import TGIPluginConfig
from chameleon_tgi.hooks import Refused, wrap_filter, wrap_generate_token, wrap_get_model, wrap_warmup

log = logging.getLogger("chameleon_tgi")

# sha256 of server/text_generation_server/<path> at the v3.3.7 tag.
TESTED_SOURCES = {
    "adapters/weights.py": "9d0c622f1681c486eba817d9f6d368443327e624d3d1720e2ce2f47f0138e62d",
    "adapters/lora.py": "a0b01e9e73ed5266ce0d7f8684bbad60ed73d1c947c5cbb581098cd47ae2d304",
    "adapters/config.py": "9b95695c4c9504027101bd49e142d7b6a853e20d8174addeabee7c37622370cc",
    "layers/lora.py": "8f58d0da5654aae1b2233f90bb88b18df5a46051ea5ed1c7c8fb7a04461400a2",
    "models/globals.py": "02eacc5141c09a7ff633bfae66dbf8c7516e1d11c925bcb59c506a48421815b0",
    "models/flash_causal_lm.py": "36b3a793f9d18d85002273404cd7c5be26fce78018ff649dc80625ae9ba53503",
    "models/__init__.py": "5ad7d15b80820d563d4f98276a0cb86ec3fc8839d92f8fa82d56d85898168985",
    "utils/adapter.py": "c2b4a477e32b8c92b5d81a1fe2fd6a37a0225a591b9afd38e3245688e55f605b",
    "utils/segments.py": "755f521fa68dfd173d774047f09d2ca66b686d75e01ef5766eb04f05e29bb9a5",
    "utils/kernels.py": "293256da335230aae1f5575ccbcaf99382491d41aedc93ad647e46ac2e4fbfa0",
}

_PKG = "text_generation_server"

# (module, dotted name, parameters it must have in this order, or None for "exists").
REQUIRED: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("models", "get_model_with_lora_adapters", None),  # must take adapter_to_index; checked below
    ("models.flash_causal_lm", "FlashCausalLM", None),
    ("models.flash_causal_lm", "FlashCausalLM.generate_token", ("self", "batch")),
    (
        "models.flash_causal_lm",
        "FlashCausalLM.warmup",
        ("self", "batch", "max_input_tokens", "max_total_tokens"),
    ),
    ("models.flash_causal_lm", "FlashCausalLMBatch", None),
    ("models.flash_causal_lm", "FlashCausalLMBatch.filter", ("self", "request_ids")),
    ("models.globals", "get_adapter_to_index", ()),
    ("models.globals", "set_adapter_to_index", ("adapter_to_index",)),
    ("models.globals", "CUDA_GRAPHS", None),
    ("models.globals", "PREFIX_CACHING", None),
    ("adapters.lora", "LoraWeights", ("weights_a", "weights_b", "adapter_config")),
    ("adapters.lora", "LoraConfig", None),
    ("adapters.weights", "LayerAdapterWeights.add_adapter", ("self", "adapter_idx", "weights")),
    ("adapters.weights", "LayerAdapterWeights.remove_adapter", ("self", "adapter_idx")),
    (
        "adapters.weights",
        "AdapterBatchData.from_meta",
        ("meta", "weights", "prefill", "prefill_head_indices"),
    ),
    (
        "layers.lora",
        "LoraLinear.forward_layer_type",
        ("self", "result", "input", "adapter_data", "layer_type", "start_idx", "end_idx"),
    ),
    ("utils.adapter", "build_layer_weight_lookup", ("model",)),
    ("utils.adapter", "BASE_MODEL_ADAPTER_ID", None),
)
# Dataclass fields the plugin reads or fills.
REQUIRED_FIELDS = {
    ("adapters.lora", "LoraConfig"): (
        "base_model_name_or_path", "r", "target_modules", "fan_in_fan_out", "lora_alpha", "use_rslora",
    ),
    ("models.flash_causal_lm", "FlashCausalLMBatch"): (
        "requests", "all_input_ids", "prefilling", "adapter_meta",
    ),
    ("adapters.weights", "AdapterBatchMetadata"): (
        "adapter_indices", "adapter_set", "adapter_segments", "segment_indices",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class TGINames:
    """The TGI objects the plugin uses, resolved once by `check_tgi`."""

    models: ModuleType
    globals: ModuleType
    FlashCausalLM: type
    FlashCausalLMBatch: type
    LoraWeights: type
    LoraConfig: type
    build_layer_weight_lookup: Any
    get_adapter_to_index: Any
    BASE_MODEL_ADAPTER_ID: str


@dataclass
class TGICheck:
    names: TGINames | None
    missing: list[str] = field(default_factory=list)  # "module: name (why)"
    version: str | None = None  # TESTED_TGI_VERSION when every tracked source matches
    differing: list[str] = field(default_factory=list)  # tracked files whose hash differs

    @property
    def ok(self) -> bool:
        return not self.missing and self.version is not None


def check_tgi() -> TGICheck:
    """Import (already-imported) TGI modules and check names, signatures and sources; never patches."""
    modules: dict[str, ModuleType] = {}
    missing: list[str] = []
    for sub in sorted({m for m, _, _ in REQUIRED} | {m for m, _ in REQUIRED_FIELDS}):
        try:
            modules[sub] = importlib.import_module(f"{_PKG}.{sub}")
        except ImportError as exc:
            missing.append(f"{_PKG}.{sub} (cannot import: {exc})")
    found: dict[str, Any] = {}
    for sub, dotted, params in REQUIRED:
        if sub not in modules:
            continue
        obj: Any = modules[sub]
        try:
            for part in dotted.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            missing.append(f"{_PKG}.{sub}.{dotted} (missing)")
            continue
        found[dotted] = obj
        if params is not None:
            have = _parameters(obj)
            if have != params:
                missing.append(f"{_PKG}.{sub}.{dotted} (parameters {have}, tested {params})")
    getter = found.get("get_model_with_lora_adapters")
    if getter is not None and "adapter_to_index" not in _parameters(getter):
        missing.append(f"{_PKG}.models.get_model_with_lora_adapters (no adapter_to_index parameter)")
    for (sub, cls), names in REQUIRED_FIELDS.items():
        target = getattr(modules.get(sub), cls, None)
        if target is None:
            continue
        have = {f.name for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else set()
        lacking = [n for n in names if n not in have]
        if lacking:
            missing.append(f"{_PKG}.{sub}.{cls} (no fields {lacking})")
    differing = [path for path, digest in TESTED_SOURCES.items() if _source_sha256(path) != digest]
    check = TGICheck(
        names=None, missing=missing, version=None if differing else TESTED_TGI_VERSION, differing=differing
    )
    if not missing:
        check.names = TGINames(
            models=modules["models"],
            globals=modules["models.globals"],
            FlashCausalLM=found["FlashCausalLM"],
            FlashCausalLMBatch=found["FlashCausalLMBatch"],
            LoraWeights=found["LoraWeights"],
            LoraConfig=found["LoraConfig"],
            build_layer_weight_lookup=found["build_layer_weight_lookup"],
            get_adapter_to_index=found["get_adapter_to_index"],
            BASE_MODEL_ADAPTER_ID=found["BASE_MODEL_ADAPTER_ID"],
        )
    return check


def _parameters(obj: Any) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return ()


def _source_sha256(relative: str) -> str | None:
    name = f"{_PKG}.{relative.removesuffix('.py').replace('/', '.').removesuffix('.__init__')}"
    try:
        path = importlib.import_module(name).__file__
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    except (ImportError, OSError):
        return None


_ORIGINALS: dict[tuple[Any, str], Any] = {}


def install(config: TGIPluginConfig | None = None) -> TGINames:
    """Check, then wrap the four names. Raises Refused (stopping TGI's start-up) with the reasons."""
    if _ORIGINALS:
        return _INSTALLED[0]
    config = config or TGIPluginConfig.from_env()
    check = check_tgi()
    if check.missing:
        raise Refused(
            f"chameleon_tgi was tested with TGI {TESTED_TGI_VERSION}; this TGI lacks what it needs:\n  "
            + "\n  ".join(check.missing)
            + "\nUnset CHAMELEON_TGI to run TGI without Chameleon."
        )
    if check.version is None:
        message = (
            f"chameleon_tgi was tested with TGI {TESTED_TGI_VERSION}; these TGI sources differ from it: "
            f"{', '.join(check.differing)}"
        )
        if not config.allow_untested:
            raise Refused(
                message + ". Set CHAMELEON_TGI_ALLOW_UNTESTED=1 to try anyway, or unset CHAMELEON_TGI."
            )
        log.warning(message + "; continuing because CHAMELEON_TGI_ALLOW_UNTESTED=1")
    names = check.names
    _bridge_logging()
    _replace(names.FlashCausalLM, "generate_token", wrap_generate_token)
    _replace(names.FlashCausalLM, "warmup", wrap_warmup)
    _replace(names.FlashCausalLMBatch, "filter", wrap_filter)
    _replace(
        names.models,
        "get_model_with_lora_adapters",
        lambda f: wrap_get_model(f, names, TGIPluginConfig.from_env),
    )
    _INSTALLED[:] = [names]
    log.info(f"chameleon_tgi installed on TGI {check.version or 'untested'} (sidecar {config.sidecar})")
    return names


_INSTALLED: list[TGINames] = []


def _replace(owner: Any, attr: str, wrap: Any) -> None:
    original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
    _ORIGINALS[(owner, attr)] = original
    setattr(owner, attr, wrap(original))


def uninstall() -> None:
    """Put the original TGI functions back (tests; a running server has no use for it)."""
    for (owner, attr), original in _ORIGINALS.items():
        setattr(owner, attr, original)
    _ORIGINALS.clear()
    _INSTALLED.clear()


def installed() -> bool:
    return bool(_ORIGINALS)


class _ToLoguru(logging.Handler):
    """TGI prints loguru records as the JSON lines its launcher shows; stdlib records would be lost."""

    def emit(self, record: logging.LogRecord) -> None:
        from loguru import logger

        logger.opt(exception=record.exc_info).log(record.levelname, record.getMessage())


def _bridge_logging() -> None:
    """Send this plugin's log records to loguru when TGI's loguru is there."""
    logger = logging.getLogger("chameleon_tgi")
    logger.setLevel(logging.INFO)
    try:
        import loguru  # noqa: F401
    except ImportError:
        return
    if not any(isinstance(h, _ToLoguru) for h in logger.handlers):
        logger.addHandler(_ToLoguru())
        logger.propagate = False
