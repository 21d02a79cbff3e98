"""The runtime inside vLLM's engine-core process: one group per scheduler step, one Adapt call per group.

What a "batch" is under continuous batching: the requests that reached the scheduler since its previous
step (`Scheduler.add_request` between two `Scheduler.schedule` calls). Right before a step, those
requests form one group: their statistics are computed in the worker (the model's own embedding
table, through vLLM's collective_rpc), one Adapt call clusters them, and each request gets its
cluster's adapter as an ordinary `LoRARequest` before the scheduler first looks at it. So:
- a request's adapter depends on the requests that arrived in the same step (its batch-mates), never
  on requests already running, and it keeps that adapter for its whole life (also when preempted);
- under light load a group is often one request (its adapter is then its own statistic's); under
  load, a step's arrivals form larger groups;
- the scheduler knows each request's adapter, so its own `max_loras` admission and its prefix cache
  (whose block hashes include the adapter) stay right.

A client that names a static LoRA keeps it; `vllm_xargs={"chameleon": "off"}` (SamplingParams
`extra_args`) opts a request out. Any failure leaves the group on the base model, counted and logged
once per change of reason; no request fails because of the sidecar. After the client's connection was
lost, the manifest is checked again before the next Adapt call (a sidecar restarted on another
artifact). With CHAMELEON_AUDIT_LOG, each group (and each opted-out or static request) writes one JSON
line: each request's adapter key or "base" and why, and each adapter's ||s B A||_F / ||W||_F.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

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
from adapter_service.core.clustering import AutoK, ClusteringPolicy
from adapter_service.models.statistics import MEAN_INPUT_EMBEDDING
from chameleon_vllm import worker
from chameleon_vllm.config import VLLMPluginConfig
from chameleon_vllm.metrics import VLLMMetrics

log = logging.getLogger("vllm.chameleon")  # under "vllm": lines appear in vLLM's own log stream

OPT_OUT_ARG = "chameleon"  # SamplingParams.extra_args["chameleon"] == "off": the base model
FIRST_LORA_ID = 1 << 30  # far above the ids vLLM's OpenAI server gives static adapters (1, 2, ...)
RPC_TIMEOUT_S = 30.0
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values


class Refused(RuntimeError):
    """chameleon_vllm will not start with these vLLM settings; the message says which to change."""


@dataclass
class StoredAdapter:
    lora_id: int
    refs: int = 0  # requests (waiting or running) that use it


def check_fit(
    manifest: ServiceManifest, facts: dict[str, Any], lora_config: Any, check_weights: bool
) -> None:
    """Raise ManifestMismatch naming every way this engine cannot serve the artifact, and what to change."""
    problems = list(facts["target_problems"])
    stat = manifest.statistic
    if stat.kind != MEAN_INPUT_EMBEDDING or stat.normalization != "l2":
        problems.append(
            f"statistic {stat.kind!r} ({stat.normalization}): chameleon_vllm computes only "
            f"{MEAN_INPUT_EMBEDDING!r} (l2); make the artifact with --statistic {MEAN_INPUT_EMBEDDING}"
        )
    elif stat.dim != facts["embedding_dim"]:
        problems.append(
            f"statistic.dim: artifact expects {stat.dim}, embeddings have {facts['embedding_dim']}"
        )
    want = manifest.base_model
    for field in ("architecture", "hidden_size", "vocab_size", "num_layers"):
        if facts[field] != getattr(want, field):
            problems.append(
                f"base_model.{field}: vLLM serves {facts[field]!r}, artifact expects "
                f"{getattr(want, field)!r} (start vLLM on the model the artifact was made for)"
            )
    if manifest.rank > lora_config.max_lora_rank:
        fits = next((r for r in MAX_LORA_RANKS if r >= manifest.rank), manifest.rank)
        problems.append(
            f"rank {manifest.rank} is above --max-lora-rank {lora_config.max_lora_rank}: "
            f"start vLLM with --max-lora-rank {fits}"
        )
    if (
        not problems
        and check_weights
        and want.weights_sha256
        and not want.accepts_weights(facts["weights_sha256"], facts["dtype"])
    ):
        problems.append(
            f"base_model.weights_sha256: the {facts['dtype']} embeddings hash to {facts['weights_sha256']}, "
            f"the artifact expects {want.weights_sha256} (float32)"
            + "".join(f" or {h} ({d})" for d, h in sorted(want.weights_sha256_by_dtype.items()))
            + ": other weights (or an artifact older than half-precision fingerprints: re-export it), "
            "or set CHAMELEON_CHECK_WEIGHTS=0"
        )
    if problems:
        raise ManifestMismatch(
            f"artifact {manifest.artifact_id} cannot be served by this vLLM engine:\n  "
            + "\n  ".join(problems)
        )


class ChameleonEngine:
    """One engine core's Chameleon state. Runs on the engine-core thread (vLLM's busy loop): no locks."""

    def __init__(
        self,
        executor: Any,
        vllm_config: Any,
        config: VLLMPluginConfig,
        client: AdapterClient | None = None,
        metrics: VLLMMetrics | None = None,
    ) -> None:
        self.executor = executor
        self.config = config
        self.lora_config = vllm_config.lora_config
        if self.lora_config is None:
            raise Refused(
                "chameleon_vllm needs vLLM's LoRA support: start vLLM with --enable-lora --max-loras N "
                "--max-lora-rank R (or LLM(enable_lora=True, ...)), or unset CHAMELEON_SIDECAR"
            )
        self.metrics = metrics or VLLMMetrics()
        self.client = client or AdapterClient(
            config.sidecar, timeout=config.deadline_s, security=config.security
        )
        self.manifest: ServiceManifest | None = None
        self._watch = ManifestWatch(self.client)
        self._log = FallbackLog(log, unit="group")
        self.audit = AuditLog(config.audit_log) if config.audit_log else None
        self._weight_sq: dict[str, float | None] = {}  # target -> ||W||_F^2 (audit only)
        self._norms: dict[str, dict[str, Any]] = {}  # adapter key -> audit norms
        self.pending: list[Any] = []  # requests added since the last step
        self.stored: OrderedDict[str, StoredAdapter] = OrderedDict()  # LRU: oldest first
        self.assigned: dict[str, str] = {}  # request id -> adapter key
        self._next_id = FIRST_LORA_ID
        # vLLM keeps max_cpu_loras adapters loaded; the store keeps as many unused ones for reuse.
        self.capacity = max(self.lora_config.max_cpu_loras or 0, self.lora_config.max_loras)

    # -- start-up -----------------------------------------------------------------------------------
    def start(self) -> None:
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
        facts = self._rpc(
            worker.describe,
            list(manifest.targets),
            self.config.check_weights and bool(manifest.base_model.weights_sha256),
            self.audit is not None,
        )
        check_fit(manifest, facts, self.lora_config, self.config.check_weights)
        self.manifest = manifest
        self._weight_sq = facts.get("weights_sq", {})
        self._norms = {}
        needed = facts["needed_modules"]
        if facts["wrapped_modules"] > len(needed):
            # vLLM's CPU LoRA path costs every wrapped layer a LoRA term, adapter or not.
            log.info(
                f"chameleon: vLLM computes LoRA terms for {facts['wrapped_modules']} layers, this artifact "
                f"adapts {len(needed)}: --lora-target-modules {' '.join(needed)} restricts vLLM to those"
            )
        log.info(
            f"chameleon attached: artifact {manifest.artifact_id}, {len(manifest.targets)} targets, "
            f"rank {manifest.rank}, policy {self.policy()}, max_loras {self.lora_config.max_loras}"
        )

    def _ensure_manifest(self, artifact_id: str | None = None) -> None:
        self._watch.ensure(
            self.manifest, artifact_id, self.config.deadline_s, self._install_manifest, self._forget
        )

    def _forget(self) -> None:
        self.manifest = None

    def policy(self) -> ClusteringPolicy:
        return self.config.policy or AutoK(max_k=min(8, self.lora_config.max_loras))

    # -- hooks (called by the scheduler wrappers; never raise) ---------------------------------------
    def added(self, request: Any) -> None:
        """A request reached the scheduler: it joins the next step's group unless it is not ours."""
        if request.lora_request is not None:
            self.metrics.requests.labels("static").inc()
            self._audit([audit_row(request.request_id, request.lora_request.lora_name, "static")])
        elif _opted_out(request) or request.prompt_token_ids is None or not request.prompt_token_ids:
            self.metrics.requests.labels("base").inc()
            why = "opted_out" if _opted_out(request) else "no_prompt_tokens"
            self._audit([audit_row(request.request_id, None, why)])
        else:
            self.pending.append(request)

    def before_schedule(self, scheduler: Any) -> None:
        if not self.pending:
            return
        arrived = [r for r in self.pending if r.request_id in scheduler.requests and not r.is_finished()]
        self.pending = []
        limit = self.manifest.max_rows if self.manifest is not None and self.manifest.max_rows > 0 else 0
        limit = limit or max(len(arrived), 1)
        for start in range(0, len(arrived), limit):  # the sidecar refuses a group above its max_rows
            self._serve_group(arrived[start : start + limit])

    def _serve_group(self, group: list[Any]) -> None:
        started = time.perf_counter()
        chosen: list[tuple[Any, str]] | None = None
        try:
            chosen = self._adapt(group)
            self.metrics.batches.labels("adapted").inc()
            self._log.adapted()
        except Fallback as exc:
            self._count_fallback(exc.reason, exc.detail)
            reason = exc.reason
        except Exception as exc:  # a bug here must not fail a request
            log.exception("chameleon plugin error; this group runs on the base model")
            self._count_fallback("plugin_error", f"{type(exc).__name__}: {exc}")
            reason = "plugin_error"
        self.metrics.prepare_seconds.observe(time.perf_counter() - started)
        if chosen is None:
            self.metrics.requests.labels("base").inc(len(group))
            self._audit([audit_row(r.request_id, None, reason) for r in group])
            return
        self._audit([audit_row(r.request_id, key) for r, key in chosen])
        for request, key in chosen:
            self._assign(request, key)
        log.info(
            f"chameleon group of {len(group)}: " + ", ".join(f"{r.request_id}->{key}" for r, key in chosen)
        )

    def released(self, request: Any) -> None:
        key = self.assigned.pop(request.request_id, None)
        if key is not None and key in self.stored:
            self.stored[key].refs -= 1

    # -- one group ----------------------------------------------------------------------------------
    def _adapt(self, group: list[Any]) -> list[tuple[Any, str]]:
        self._ensure_manifest()
        manifest = self.manifest
        stats = self._rpc(worker.statistics, [list(r.prompt_token_ids) for r in group])
        called = time.perf_counter()
        try:
            answer = self.client.adapt(
                stats,
                request_ids=[r.request_id for r in group],
                policy=self.policy(),
                dtype=self._wire_dtype(),
                held_keys=list(self.stored)[-self.config.max_held_keys :]
                if self.config.max_held_keys
                else [],
                timeout=self.config.deadline_s,
            )
        except (AdapterServiceError, InvalidResponse) as exc:
            raise sidecar_fallback(exc) from exc
        finally:
            self.metrics.sidecar_seconds.observe(time.perf_counter() - called)
        if answer.artifact_id != manifest.artifact_id:
            self._ensure_manifest(answer.artifact_id)
            raise Fallback("manifest_mismatch", f"the service switched to artifact {answer.artifact_id}")
        new: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for cluster in answer.clusters:
            if cluster.key in self.stored:
                self.stored.move_to_end(cluster.key)
                self.metrics.adapters.labels("cache").inc()
                continue
            if cluster.omitted:
                raise Fallback("cache_miss", f"adapter {cluster.key} was left out but is not held")
            new[cluster.key] = _scaled(cluster, manifest.scaling)
            if self.audit is not None:
                self._remember_norms(cluster.key, new[cluster.key])
            self.metrics.adapters.labels("sidecar").inc()
        drop = self._evictable(len(new), keep={c.key for c in answer.clusters})
        size = self._rpc(worker.update_store, new, {key: self.stored[key].lora_id for key in drop})
        for key in drop:
            del self.stored[key]
        if drop:
            self.metrics.evictions.inc(len(drop))
        for key in new:
            self.stored[key] = StoredAdapter(self._next_id)
            self._next_id += 1
        self.metrics.stored.set(size)
        keys = [c.key for c in answer.clusters]
        return [(request, keys[c]) for request, c in zip(group, answer.assignments.tolist(), strict=True)]

    def _evictable(self, incoming: int, keep: set[str]) -> list[str]:
        """Unused adapters to drop so the store holds at most `capacity` after `incoming` arrive (oldest
        first); adapters some request still uses are never dropped, so the store may exceed it then."""
        excess = len(self.stored) + incoming - self.capacity
        drop = []
        for key, adapter in self.stored.items():
            if excess <= 0:
                break
            if adapter.refs <= 0 and key not in keep:
                drop.append(key)
                excess -= 1
        return drop

    def _assign(self, request: Any, key: str) -> None:
        from vllm.lora.request import LoRARequest

        adapter = self.stored[key]
        adapter.refs += 1
        self.assigned[request.request_id] = key
        request.lora_request = LoRARequest(
            lora_name=f"chameleon-{key}", lora_int_id=adapter.lora_id, lora_path=worker.SCHEME + key
        )
        if request._block_hasher is not None:  # prefix-cache hashes include the adapter: recompute
            request.block_hashes = []
            request.update_block_hashes()
        self.metrics.requests.labels("cluster").inc()

    def _rpc(self, method: Any, *args: Any) -> Any:
        return self.executor.collective_rpc(method, timeout=RPC_TIMEOUT_S, args=args)[0]

    def _wire_dtype(self) -> str:
        if self.config.wire_dtype is not None:
            return self.config.wire_dtype
        return "bfloat16" if str(self.lora_config.lora_dtype).endswith("bfloat16") else "float16"

    def _count_fallback(self, reason: str, detail: str) -> None:
        self.metrics.batches.labels("fallback").inc()
        self.metrics.fallbacks.labels(reason).inc()
        self._log.fallback(reason, detail)

    def _audit(self, rows: list[dict[str, Any]]) -> None:
        if self.audit is not None:
            self.audit.write_batch(self.manifest, rows, self._norms)

    def _remember_norms(self, key: str, modules: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """||s B A||_F / ||W||_F of one adapter (A, s B in float32) from r x r Gram matrices."""
        delta_sq = {name: float(((a @ a.T) * (b.T @ b)).sum()) for name, (a, b) in modules.items()}
        self._norms[key] = adapter_norms(delta_sq, self._weight_sq)
        while len(self._norms) > 4096:
            del self._norms[next(iter(self._norms))]

    def close(self) -> None:
        self.client.close()


def _opted_out(request: Any) -> bool:
    extra = getattr(request.sampling_params, "extra_args", None) or {}
    return str(extra.get(OPT_OUT_ARG, "")).lower() == "off"


def _scaled(cluster: Any, scaling: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(A, s·B) per module in float32; a non-finite value makes the whole answer unusable."""
    modules = {}
    for name, delta in cluster.modules.items():
        a = np.ascontiguousarray(delta.a, dtype=np.float32)
        b = np.ascontiguousarray(delta.b, dtype=np.float32) * np.float32(scaling)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise Fallback("invalid_response", f"non-finite values in adapter {cluster.key}")
        modules[name] = (a, b)
    return modules
