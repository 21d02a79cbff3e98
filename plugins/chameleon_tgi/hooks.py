"""The runtime inside TGI's shard: statistic at first prefill, one Adapt call, registration, release.

Wrapped into TGI by patch.py (TGI_INTERNALS.md, section 5, design 1):
- `get_model_with_lora_adapters` -> `attach()`: check the settings and the sidecar's manifest against the
  model, register the zero identity adapter before warmup (so KV sizing sees it);
- `FlashCausalLM.warmup`: the synthetic warmup batch is left alone;
- `FlashCausalLM.generate_token`: when `batch.prefilling`, requests not seen yet get their statistic from
  `batch.all_input_ids[i]` (the full prompt, also under chunked prefill) through the embedding table and
  the shared `mean_input_embedding`; one blocking Adapt call for them, made on a worker thread (not on
  TGI's asyncio loop); their clusters are registered and `request.adapter_id` is rewritten on the
  protobuf objects in `batch.requests`, before TGI's prepare_for_prefill reads it;
- `FlashCausalLMBatch.filter` and a finished batch release requests; batch objects that disappear any
  other way (ClearCache) are released when collected.
Any sidecar failure or plugin error sends the new requests to the identity adapter (the base model's
output, in the same single rank group: risk 4) and counts the reason (logged once per change of reason);
generation never fails for it. After the client's connection was lost, the manifest is checked again
before the next Adapt call (a sidecar restarted on another artifact). With CHAMELEON_AUDIT_LOG, each
prefill with new requests writes one JSON line: each request's adapter key or "base" and why, and each
adapter's ||s B A||_F / ||W||_F.
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import itertools
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

import torch

from adapter_service.client import AdapterClient, AdapterServiceError, InvalidResponse, ServiceManifest
from adapter_service.client.audit import AuditLog, adapter_norms
from adapter_service.client.audit import row as audit_row
from adapter_service.client.fallback import (
    Fallback,
    FallbackLog,
    ManifestMismatch,
    ManifestWatch,
    sidecar_fallback,
)
from adapter_service.core import codec
from adapter_service.models.spec import weights_problem
from adapter_service.models.statistics import MEAN_INPUT_EMBEDDING, prompts_mean_input_embedding
from chameleon_tgi.config import TGIPluginConfig
from chameleon_tgi.layout import (
    LayerTypeShape,
    identity_lists,
    layer_type_lists,
    padded_rank,
    plan_layer_types,
)
from chameleon_tgi.metrics import TGIMetrics
from chameleon_tgi.registry import NAME_PREFIX, AdapterSlots, Prepared

if TYPE_CHECKING:
    from chameleon_tgi.patch import TGINames

log = logging.getLogger("chameleon_tgi")

RUNTIME_ATTR = "_chameleon_tgi"
ACTIVE: ChameleonTGI | None = None  # the shard's runtime; FlashCausalLMBatch.filter has no model to ask


class Refused(RuntimeError):
    """chameleon_tgi will not run with these TGI settings; the message says which and why."""


def find_embedding(model: Any) -> torch.nn.Module:
    """The token embedding: `model.model.embed_tokens` (llama, mistral, qwen2, gemma) or one level deeper
    (starcoder2)."""
    inner = getattr(model, "model", None)
    for holder in (inner, getattr(inner, "model", None)):
        embedding = getattr(holder, "embed_tokens", None)
        if embedding is not None and isinstance(getattr(embedding, "weight", None), torch.Tensor):
            return embedding
    raise Refused(
        f"{type(model).__name__}: no model.embed_tokens or model.model.embed_tokens with a weight; "
        "chameleon_tgi supports TGI's flash llama, mistral, qwen2, gemma2, gemma3 and starcoder2 models"
    )


def check_settings(model: Any, names: TGINames) -> None:
    """Refuse the settings under which registered adapters would be wrong or silently skipped."""
    problems = []
    world = model.process_group.size()
    if world != 1:
        problems.append(
            f"{world} shards: run with --num-shard 1 (row-parallel LoRA under tensor parallelism is "
            "unverified, TGI_INTERNALS.md risk 3, and every rank would need the same sidecar answer)"
        )
    if names.globals.CUDA_GRAPHS:
        problems.append(
            f"CUDA graphs {names.globals.CUDA_GRAPHS}: run with --cuda-graphs 0 (decode replays graphs "
            "captured without adapter_data, so adapters are silently dropped; risk 2)"
        )
    if names.globals.PREFIX_CACHING:
        problems.append(
            "prefix caching is on: set PREFIX_CACHING=0 (the radix cache ignores adapter_id and would reuse "
            "KV computed under another cluster's adapter; risk 7)"
        )
    if problems:
        raise Refused("chameleon_tgi cannot run with these TGI settings:\n  " + "\n  ".join(problems))


def check_fit(
    model: Any, embedding: torch.nn.Module, manifest: ServiceManifest, names: TGINames, check_weights: bool
):
    """Raise ManifestMismatch listing every way the served model differs from what the artifact expects."""
    problems = []
    stat = manifest.statistic
    if stat.kind != MEAN_INPUT_EMBEDDING or stat.normalization != "l2":
        problems.append(
            f"statistic {stat.kind!r} ({stat.normalization}): this plugin computes "
            f"{MEAN_INPUT_EMBEDDING!r} (l2)"
        )
    config = getattr(model, "config", None)
    want = manifest.base_model
    have = {
        "architecture": (getattr(config, "architectures", None) or [None])[0],
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
    }
    for field, value in have.items():
        if value != getattr(want, field):
            problems.append(
                f"base_model.{field}: model has {value!r}, artifact expects {getattr(want, field)!r}"
            )
    weight = embedding.weight
    if weight.shape[1] != stat.dim:
        problems.append(f"statistic.dim: artifact expects {stat.dim}, embeddings have {weight.shape[1]}")
    num_layers = have["num_layers"] or 0
    try:
        plan = plan_layer_types(manifest.targets, num_layers)
    except ValueError as exc:
        problems.append(str(exc))
        plan = {}
    try:
        lookup = names.build_layer_weight_lookup(model.model)
    except Exception as exc:  # an architecture whose layers TGI does not wrap for LoRA
        lookup = {}
        problems.append(f"TGI's LoRA layer lookup fails on {type(model.model).__name__}: {exc!r}")
    by_name = {weight_name: (key, module) for key, (weight_name, module) in lookup.items()}
    for name, d_in, d_out in manifest.targets:
        if name not in by_name:
            problems.append(f"target {name!r}: TGI's model has no LoRA layer of that name")
            continue
        (_, layer_type), module = by_name[name]
        shape = _lora_shape(module, layer_type)
        if shape is not None and shape != (d_in, d_out):
            problems.append(
                f"target {name!r}: TGI's layer has (d_in, d_out) = {shape}, artifact expects {(d_in, d_out)}"
            )
    if not problems and check_weights:
        problem = weights_problem(weight[: want.vocab_size], want)
        if problem:
            problems.append(f"{problem} (or CHAMELEON_CHECK_WEIGHTS=0)")
    if problems:
        raise ManifestMismatch(
            f"artifact {manifest.artifact_id} does not fit this model:\n  " + "\n  ".join(problems)
        )
    return plan


def _weight_sq(module: Any, layer_type: str) -> float | None:
    """||W||_F^2 of one sub-projection of a TGI LoRA wrapper (its rows of a fused weight); None when
    unreadable (quantized)."""
    weight = getattr(getattr(getattr(module, "base_layer", None), "linear", None), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        return None
    layer_names, sizes = getattr(module, "layer_names", None), getattr(module, "sizes", None)
    if sizes is not None and layer_names is not None and layer_type in layer_names:
        index = layer_names.index(layer_type)
        start = sum(sizes[:index])
        weight = weight[start : start + sizes[index]]
    return float(weight.detach().float().square().sum())


def _lora_shape(module: Any, layer_type: str) -> tuple[int, int] | None:
    """(d_in, d_out) of one sub-projection of a TGI LoRA wrapper; None when unreadable (quantized)."""
    weight = getattr(getattr(getattr(module, "base_layer", None), "linear", None), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    d_out, d_in = weight.shape
    layer_names, sizes = getattr(module, "layer_names", None), getattr(module, "sizes", None)
    if sizes is not None and layer_names is not None and layer_type in layer_names:
        d_out = sizes[layer_names.index(layer_type)]
    return int(d_in), int(d_out)


class ChameleonTGI:
    """One shard's Chameleon state. Runs on TGI's thread; only the Adapt call goes to a worker thread."""

    def __init__(
        self,
        model: Any,
        adapter_to_index: dict[str, int],
        names: TGINames,
        config: TGIPluginConfig,
        client: AdapterClient | None = None,
        metrics: TGIMetrics | None = None,
    ) -> None:
        self.model = model
        self.names = names
        self.config = config
        self.metrics = metrics or TGIMetrics()
        self.embedding = find_embedding(model)
        self.num_layers = int(model.config.num_hidden_layers)
        self._dict = adapter_to_index
        self.slots = AdapterSlots(
            model.layer_to_adapter_weights,
            self.adapter_to_index,
            config.cache_bytes,
            on_change=lambda slots: self.metrics.slots.set(len(slots)),
        )
        self.client = client or AdapterClient(
            config.sidecar, timeout=config.deadline_s, security=config.security
        )
        self.manifest: ServiceManifest | None = None
        self._watch = ManifestWatch(self.client)
        self._log = FallbackLog(log)
        self.audit = AuditLog(config.audit_log) if config.audit_log else None
        self._weight_sq: dict[str, float | None] = {}  # target -> ||W||_F^2 (audit only)
        self._norms: dict[str, dict[str, Any]] = {}  # adapter key -> audit norms
        self.plan: dict[str, LayerTypeShape] = {}
        self.identity_key: str | None = None
        self.warming = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="chameleon-sidecar")
        self._live: dict[int, frozenset[int]] = {}
        self._tokens = itertools.count()

    def adapter_to_index(self) -> dict[str, int]:
        """TGI's published dict once server.py set it; until then the very dict it will publish."""
        current = self.names.get_adapter_to_index()
        return current if current is not None else self._dict

    # -- start-up -----------------------------------------------------------------------------------
    def start(self) -> None:
        check_settings(self.model, self.names)
        try:
            manifest = self.client.manifest(timeout=self.config.manifest_timeout_s, refresh=True)
        except AdapterServiceError as exc:
            log.warning(
                "chameleon sidecar unreachable at start-up; serving the base model until it answers "
                f"(address={self.client.address}, error={exc})"
            )
            return
        self._install_manifest(manifest)

    def _install_manifest(self, manifest: ServiceManifest) -> None:
        plan = check_fit(self.model, self.embedding, manifest, self.names, self.config.check_weights)
        old_identity = self.identity_key
        self.manifest, self.plan = manifest, plan
        self._norms = {}
        self._weight_sq = self._target_weights(manifest) if self.audit is not None else {}
        self.slots.forget_unregistered()
        key = f"identity-{manifest.artifact_id}"
        lists = identity_lists(
            plan, self.num_layers, manifest.rank, device=self.weight.device, dtype=self.weight.dtype
        )
        self.slots.put(Prepared(key, self._lora_weights(lists), _nbytes(lists)))
        self.slots.pin(key)
        self.identity_key = key
        if old_identity is not None and old_identity != key:
            self.slots.unpin(old_identity)
        log.info(
            f"chameleon attached: artifact {manifest.artifact_id}, layer types {sorted(plan)}, "
            f"rank {manifest.rank} "
            f"padded to {padded_rank(manifest.rank)}, identity adapter {self.slots.name(key)}"
        )

    def _ensure_manifest(self, artifact_id: str | None = None) -> None:
        self._watch.ensure(
            self.manifest, artifact_id, self.config.deadline_s, self._install_manifest, self._forget
        )

    def _target_weights(self, manifest: ServiceManifest) -> dict[str, float | None]:
        lookup = self.names.build_layer_weight_lookup(self.model.model)
        by_name = {weight_name: (key, module) for key, (weight_name, module) in lookup.items()}
        return {
            name: _weight_sq(by_name[name][1], by_name[name][0][1]) if name in by_name else None
            for name, _, _ in manifest.targets
        }

    def _forget(self) -> None:
        self.manifest = None

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    # -- per step (called by the wrappers; never raise) ---------------------------------------------
    def before_step(self, batch: Any) -> None:
        if self.warming:
            return
        try:
            self._track(batch)
        except Exception:
            log.exception("chameleon: could not track a batch")
        if batch.prefilling:
            self._assign_new(batch)

    def after_step(self, batch: Any, next_batch: Any) -> None:
        if self.warming:
            return
        try:
            if next_batch is None:  # every request stopped: TGI drops the batch
                self.release(r.id for r in batch.requests)
        except Exception:
            log.exception("chameleon: could not release a finished batch")

    def filtered(self, old: Any, new: Any, request_ids: list[int]) -> None:
        try:
            kept = set(request_ids)
            self.release(r.id for r in old.requests if r.id not in kept)
            self._track(new)
        except Exception:
            log.exception("chameleon: could not release filtered requests")

    def release(self, request_ids: Any) -> None:
        evicted = self.slots.release(list(request_ids))
        if evicted:
            self.metrics.evictions.inc(len(evicted))
            log.info(f"chameleon evicted {', '.join(self.slots.name(k) for k in evicted)}")

    def _track(self, batch: Any) -> None:
        """Release a batch's requests when TGI drops the batch object without filtering it (ClearCache)."""
        token = getattr(batch, "_chameleon_token", None)
        if token in self._live:
            return
        token = next(self._tokens)
        batch._chameleon_token = token
        self._live[token] = frozenset(r.id for r in batch.requests)
        weakref.finalize(batch, self._batch_gone, token)

    def _batch_gone(self, token: int) -> None:
        gone = self._live.pop(token, frozenset())
        alive = frozenset().union(*self._live.values())
        try:
            self.release(gone - alive)
        except Exception:
            log.exception("chameleon: could not release a collected batch")

    # -- assignment ---------------------------------------------------------------------------------
    def _assign_new(self, batch: Any) -> None:
        new = [(i, r) for i, r in enumerate(batch.requests) if r.id not in self.slots]
        if not new:
            return
        adapters = self.adapter_to_index()
        managed, opted_out = [], []
        audit: dict[int, dict[str, Any]] = {}  # request id -> audit row
        for i, request in new:
            adapter_id = request.adapter_id
            if adapter_id == self.names.BASE_MODEL_ADAPTER_ID:
                opted_out.append(request)
                audit[request.id] = audit_row(request.id, None, "opted_out")
            elif adapter_id and not adapter_id.startswith(NAME_PREFIX) and adapter_id in adapters:
                self.slots.track(request.id)  # a static LORA_ADAPTERS adapter the client chose: kept
                self.metrics.requests.labels("static").inc()
                audit[request.id] = audit_row(request.id, adapter_id, "static")
            else:
                managed.append((i, request))
        chosen: list[tuple[Any, Prepared]] | None = None
        reason = None
        if managed:
            started = time.perf_counter()
            try:
                chosen = self._adapt(batch, managed)
                self.metrics.batches.labels("adapted").inc()
                self._log.adapted()
            except Fallback as exc:
                reason = exc.reason
                self._count_fallback(exc.reason, exc.detail)
            except Exception as exc:  # a bug here must not fail generation
                reason = "plugin_error"
                log.exception("chameleon plugin error; these requests run on the base model")
                self._count_fallback("plugin_error", f"{type(exc).__name__}: {exc}")
            self.metrics.prepare_seconds.observe(time.perf_counter() - started)
        for _, request in managed:
            audit[request.id] = audit_row(request.id, None, reason)
        for request, prepared in chosen or ():
            audit[request.id] = audit_row(request.id, prepared.key)
        if self.audit is not None:
            self._write_audit([audit[request.id] for _, request in new])
        try:
            for request, prepared in chosen or ():
                request.adapter_id = self.slots.assign(request.id, prepared)
                self.metrics.requests.labels("cluster").inc()
            for request in opted_out:
                self._to_base(request, managed=False)
            if chosen is None:
                for _, request in managed:
                    self._to_base(request, managed=True)
        except Exception:
            log.exception("chameleon: could not assign adapters; unassigned requests run on the base model")
            for _, request in new:
                if request.id not in self.slots:
                    self._to_base(request, managed=request.adapter_id != self.names.BASE_MODEL_ADAPTER_ID)

    def _write_audit(self, rows: list[dict[str, Any]]) -> None:
        self.audit.write_batch(self.manifest, rows, self._norms)

    def _remember_norms(self, key: str, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], s: float):
        """||s B A||_F / ||W||_F of one adapter from r x r Gram matrices (as chameleon_torch does)."""
        delta_sq = {}
        for name, (a, b) in modules.items():
            a, b = a.float(), b.float()
            delta_sq[name] = float(((a @ a.t()) * (b.t() @ b)).sum()) * s * s
        self._norms[key] = adapter_norms(delta_sq, self._weight_sq)
        while len(self._norms) > 4096:
            del self._norms[next(iter(self._norms))]

    def _to_base(self, request: Any, managed: bool) -> None:
        """The identity adapter when there is one (one rank group for the batch), else TGI's base model."""
        if self.identity_key is not None:
            request.adapter_id = self.slots.assign(request.id, self.slots.get(self.identity_key))
        else:
            if managed:
                request.adapter_id = ""
            self.slots.track(request.id)
        self.metrics.requests.labels("base").inc()

    def _adapt(self, batch: Any, managed: list[tuple[int, Any]]) -> list[tuple[Any, Prepared]]:
        self._ensure_manifest()
        manifest = self.manifest
        stats = self.statistics([batch.all_input_ids[i] for i, _ in managed])
        called = time.perf_counter()
        future = self._executor.submit(
            self.client.adapt,
            stats,
            request_ids=[str(request.id) for _, request in managed],
            policy=self.config.policy,
            dtype=self._wire_dtype(),
            held_keys=self.slots.held_keys(self.config.max_held_keys),
            timeout=self.config.deadline_s,
        )
        try:
            answer = future.result(timeout=self.config.deadline_s + 5.0)
        except (AdapterServiceError, InvalidResponse) as exc:
            raise sidecar_fallback(exc) from exc
        except concurrent.futures.TimeoutError as exc:
            raise Fallback("deadline", "the Adapt call outlived its deadline") from exc
        finally:
            self.metrics.sidecar_seconds.observe(time.perf_counter() - called)
        if answer.artifact_id != manifest.artifact_id:
            self._ensure_manifest(answer.artifact_id)
            raise Fallback("manifest_mismatch", f"the service switched to artifact {answer.artifact_id}")
        prepared = [self._prepare(cluster, manifest) for cluster in answer.clusters]
        return [
            (request, prepared[c])
            for (_, request), c in zip(managed, answer.assignments.tolist(), strict=True)
        ]

    def statistics(self, prompts: list[list[int]]) -> torch.Tensor:
        """The shared statistic of each full prompt ([N, D] float32), pads excluded."""
        return prompts_mean_input_embedding(self.weight, prompts)

    def _prepare(self, cluster: Any, manifest: ServiceManifest) -> Prepared:
        if cluster.omitted:
            cached = self.slots.get(cluster.key)
            if cached is None:
                raise Fallback("cache_miss", f"adapter {cluster.key} was left out but is not cached")
            self.metrics.adapters.labels("cache").inc()
            return cached
        modules = {name: (codec.to_torch(d.a), codec.to_torch(d.b)) for name, d in cluster.modules.items()}
        if self.audit is not None:
            self._remember_norms(cluster.key, modules, manifest.scaling)
        weight = self.weight
        lists = layer_type_lists(
            modules, self.plan, self.num_layers, manifest.scaling, device=weight.device, dtype=weight.dtype
        )
        total = torch.stack([sum(t.sum() for t in a + b) for a, b in lists.values()]).sum()
        if not torch.isfinite(total):  # NaN/Inf survive a sum; one sync per cluster
            raise Fallback("invalid_response", f"non-finite values in adapter {cluster.key}")
        self.metrics.adapters.labels("sidecar").inc()
        return self.slots.put(Prepared(cluster.key, self._lora_weights(lists), _nbytes(lists)))

    def _lora_weights(
        self, lists: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]
    ) -> dict[str, Any]:
        out = {}
        for layer_type, (weights_a, weights_b) in lists.items():
            rank = weights_a[0].shape[1]
            config = self.names.LoraConfig(
                base_model_name_or_path=str(getattr(self.model, "model_id", "")),
                r=rank,  # already padded, as prepare_weights leaves config.r
                target_modules=[layer_type],
                fan_in_fan_out=False,
                lora_alpha=rank,  # the scale is folded into B: alpha / r = 1
                use_rslora=False,
            )
            out[layer_type] = self.names.LoraWeights(weights_a, weights_b, config)
        return out

    def _wire_dtype(self) -> str:
        if self.config.wire_dtype is not None:
            return self.config.wire_dtype
        return "bfloat16" if self.weight.dtype == torch.bfloat16 else "float16"

    def _count_fallback(self, reason: str, detail: str) -> None:
        self.metrics.batches.labels("fallback").inc()
        self.metrics.fallbacks.labels(reason).inc()
        self._log.fallback(reason, detail)

    def close(self) -> None:
        self._executor.shutdown(wait=False)
        self.client.close()


def _nbytes(lists: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]) -> int:
    return sum(t.numel() * t.element_size() for a, b in lists.values() for t in a + b)


# -- wrappers installed by patch.py ----------------------------------------------------------------
def wrap_generate_token(original: Any) -> Any:
    @functools.wraps(original)
    def generate_token(self: Any, batch: Any) -> Any:
        runtime = getattr(self, RUNTIME_ATTR, None)
        if runtime is None:
            return original(self, batch)
        runtime.before_step(batch)
        result = original(self, batch)
        runtime.after_step(batch, result[1])
        return result

    return generate_token


def wrap_warmup(original: Any) -> Any:
    @functools.wraps(original)
    def warmup(self: Any, *args: Any, **kwargs: Any) -> Any:
        runtime = getattr(self, RUNTIME_ATTR, None)
        if runtime is None:
            return original(self, *args, **kwargs)
        runtime.warming = True
        try:
            return original(self, *args, **kwargs)
        finally:
            runtime.warming = False

    return warmup


def wrap_filter(original: Any) -> Any:
    @functools.wraps(original)
    def filter(self: Any, request_ids: list[int]) -> Any:
        new = original(self, request_ids)
        if ACTIVE is not None:
            ACTIVE.filtered(self, new, request_ids)
        return new

    return filter


def wrap_get_model(original: Any, names: TGINames, config_factory: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def get_model_with_lora_adapters(*args: Any, **kwargs: Any) -> Any:
        model = original(*args, **kwargs)
        adapter_to_index = signature.bind(*args, **kwargs).arguments["adapter_to_index"]
        attach(model, adapter_to_index, names, config_factory())
        return model

    return get_model_with_lora_adapters


def attach(
    model: Any,
    adapter_to_index: dict[str, int],
    names: TGINames,
    config: TGIPluginConfig,
    client: AdapterClient | None = None,
    metrics: TGIMetrics | None = None,
) -> ChameleonTGI | None:
    """Start Chameleon on a freshly loaded TGI model; Refused/ManifestMismatch on a setup it cannot serve."""
    global ACTIVE
    if not isinstance(model, names.FlashCausalLM):
        log.warning(f"chameleon_tgi: {type(model).__name__} is not a FlashCausalLM; Chameleon stays off")
        return None
    runtime = ChameleonTGI(model, adapter_to_index, names, config, client, metrics)
    runtime.start()
    setattr(model, RUNTIME_ATTR, runtime)
    ACTIVE = runtime
    if config.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(config.metrics_port, registry=runtime.metrics.registry)
        log.info(f"chameleon metrics on :{config.metrics_port}/metrics")
    return runtime
