"""attach(): check a model against the sidecar's manifest, hook its target modules, adapt batches.

Per batch (`with handle.adapt(input_ids, attention_mask):`), the plugin computes each prompt's
statistic with the shared function, makes one Adapt call (sending the keys it already holds),
installs the per-cluster factors on the model's device, and the hooks apply each row's adapter in
prefill and every decode step. A mixture artifact answers in the compact form: the plugin then keeps its
bases once and applies every row's weights through the row mask, so per-request adapters cost what one
adapter costs. Whatever goes wrong on the sidecar's side, the batch runs on the
base model, a warning is logged (once per change of reason) and a metric counts the reason: generation
never fails because of it. After the client's connection was lost, the manifest is fetched again before
the next adapted batch, so a sidecar restarted on another artifact is checked as at attach. The drift
guard (layer.RowGuard) serves single rows on the base model when their adapter misbehaves, and the
optional audit log records per batch which adapter served each row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from adapter_service.client import (
    AdapterClient,
    AdapterServiceError,
    AdaptResult,
    InvalidResponse,
    ServiceManifest,
)
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
from adapter_service.core.clustering import AutoK, ClusteringPolicy, FixedK, PerRequest
from adapter_service.core.compact import column_weights
from adapter_service.models.spec import fingerprint, linear_shape, weights_problem
from adapter_service.models.statistics import (
    SENTENCE_ENCODER,
    compute_statistic,
    statistic_dim,
    statistic_layer,
)
from chameleon_torch.cache import AdapterCache
from chameleon_torch.config import PluginConfig
from chameleon_torch.layer import BatchBank, HookedModel, RowGuard, lora_factors
from chameleon_torch.metrics import PluginMetrics

log = logging.getLogger("chameleon_torch")


@dataclass
class BatchAdaptation:
    """What happened to one batch; yielded by `handle.adapt()`."""

    adapted: bool = False
    fallback_reason: str | None = None
    assignments: np.ndarray | None = None  # cluster index per row
    k: int = 0
    keys: tuple[str, ...] = ()
    seconds: float = 0.0  # statistic + sidecar + install
    # Rows the drift guard served on the base model: row -> "non_finite" | "delta_ratio". Filled when
    # the `with` block ends (the guard looks at the prefill run inside it).
    guarded: dict[int, str] = dataclasses.field(default_factory=dict)


def check_model(
    model: nn.Module, manifest: ServiceManifest, check_weights: bool = True, tokenizer: Any = None
) -> None:
    """Raise ManifestMismatch listing every way the model differs from what the artifact expects.

    `tokenizer`: the model's; only a sentence-encoder statistic needs it (to decode prompts)."""
    problems = []
    stat = manifest.statistic
    try:
        statistic_layer(stat, model)
        if stat.normalization != "l2":
            raise ValueError(f"statistic.normalization: {stat.normalization!r}; expected 'l2'")
        if stat.kind == SENTENCE_ENCODER and tokenizer is None:
            raise ValueError("it decodes prompts to text; attach(..., tokenizer=) the model's tokenizer")
        expected_dim = statistic_dim(model, stat)  # loads a sentence encoder: fails here, not per batch
        if stat.dim != expected_dim:
            problems.append(
                f"statistic.dim: artifact expects {stat.dim}, this plugin computes {expected_dim}"
            )
    except ValueError as exc:
        problems.append(
            f"statistic {stat.kind!r} {dict(stat.params)} cannot be computed by this plugin: {exc}"
        )
    fp, want = fingerprint(model, hash_weights=False), manifest.base_model
    for field in ("architecture", "hidden_size", "vocab_size", "num_layers"):
        if getattr(fp, field) != getattr(want, field):
            problems.append(
                f"base_model.{field}: model has {getattr(fp, field)!r}, artifact expects "
                f"{getattr(want, field)!r}"
            )
    modules = dict(model.named_modules())
    for name, d_in, d_out in manifest.targets:
        if name not in modules:
            problems.append(f"target {name!r}: no such module in the model")
            continue
        shape = linear_shape(modules[name])
        if shape is None:
            problems.append(f"target {name!r}: {type(modules[name]).__name__} is not nn.Linear or Conv1D")
        elif shape != (d_in, d_out):
            problems.append(
                f"target {name!r}: model has (d_in, d_out) = {shape}, artifact expects {(d_in, d_out)}"
            )
    if not problems and check_weights:
        problem = weights_problem(model.get_input_embeddings().weight, want)
        if problem:
            problems.append(problem)
    if problems:
        raise ManifestMismatch(
            f"artifact {manifest.artifact_id} does not fit this model:\n  " + "\n  ".join(problems)
        )


class AdapterHandle:
    """A model attached to an adapter service. One batch at a time (`adapt` is not re-entrant)."""

    def __init__(
        self,
        model: nn.Module,
        client: AdapterClient,
        config: PluginConfig,
        metrics: PluginMetrics | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.client = client
        self.config = config
        self.metrics = metrics or PluginMetrics()
        self.cache = AdapterCache(config.cache_bytes)
        self.manifest: ServiceManifest | None = None
        self._hooks: HookedModel | None = None
        self._lock = threading.Lock()
        self._detached = False
        self._watch = ManifestWatch(client)
        self._log = FallbackLog(log)
        self.audit = AuditLog(config.audit_log) if config.audit_log is not None else None
        self._norms: OrderedDict[str, dict[str, Any]] = OrderedDict()  # adapter key -> audit norms
        self._weight_sq: dict[str, float] = {}  # target -> ||W||_F^2, for the audit
        self._guarded_keys: OrderedDict[str, str] = OrderedDict()  # adapters the guard warned about

    # -- manifest ---------------------------------------------------------------------------------
    def _install_manifest(self, manifest: ServiceManifest) -> None:
        check_model(self.model, manifest, self.config.check_weights, self.tokenizer)
        if self._hooks is not None:
            self._hooks.remove()
        self.manifest = manifest
        self.cache.clear()
        self._norms.clear()
        self._weight_sq = {}
        self._hooks = HookedModel(self.model, [name for name, _, _ in manifest.targets])
        log.info(
            "attached",
            extra={
                "artifact_id": manifest.artifact_id,
                "targets": len(manifest.targets),
                "rank": manifest.rank,
            },
        )

    def _ensure_manifest(self, artifact_id: str | None = None) -> None:
        self._watch.ensure(
            self.manifest, artifact_id, self.config.deadline_s, self._install_manifest, self._forget
        )

    def _forget(self) -> None:
        self.manifest = None
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    # -- per batch --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def adapt(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        request_ids: Sequence[str] | None = None,
    ) -> Iterator[BatchAdaptation]:
        """Apply each row's cluster adapter to everything the model runs inside the block.

        `request_ids` (one per row) go to the sidecar and the audit log (which otherwise names rows by
        index)."""
        if self._detached:
            raise RuntimeError("this handle was detached; attach the model again")
        if request_ids is not None and len(request_ids) != input_ids.shape[0]:
            raise ValueError(f"request_ids: {len(request_ids)} ids for {input_ids.shape[0]} rows")
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("adapt() is already active for this model; run one batch at a time")
        result = BatchAdaptation()
        bank = None
        try:
            started = time.perf_counter()
            try:
                bank = self._prepare(input_ids, attention_mask, result, request_ids)
            except Fallback as exc:
                self._count_fallback(result, exc.reason, exc.detail)
            except Exception as exc:  # never let a plugin bug fail a generation
                log.exception("chameleon plugin error; running the base model")
                self._count_fallback(result, "plugin_error", f"{type(exc).__name__}: {exc}")
            result.seconds = time.perf_counter() - started
            self.metrics.prepare_seconds.observe(result.seconds)
            if bank is not None:
                result.adapted = True
                self.metrics.batches.labels("adapted").inc()
                self._log.adapted()
                self._hooks.bank = bank
            try:
                yield result
            finally:
                if self._hooks is not None:
                    self._hooks.bank = None
                self._finish(bank, result, input_ids.shape[0], request_ids)
        finally:
            self._lock.release()

    def _finish(
        self,
        bank: BatchBank | None,
        result: BatchAdaptation,
        rows: int,
        request_ids: Sequence[str] | None,
    ) -> None:
        """After the block: count the rows the guard flagged, write the audit line. Never raises."""
        try:
            if bank is not None and bank.guard is not None:
                result.guarded = bank.guard.flagged()
                for reason in result.guarded.values():
                    self.metrics.guarded_rows.labels(reason).inc()
                self._log_guarded(result)
            if self.audit is not None:
                self._write_audit(result, rows, request_ids)
        except Exception:
            log.exception("chameleon: could not account for a finished batch")

    def _log_guarded(self, result: BatchAdaptation) -> None:
        """A warning the first time an adapter is guarded (a cached bad adapter would repeat every
        batch); the counter has every row."""
        for row, reason in result.guarded.items():
            key = result.keys[int(result.assignments[row])]
            if key in self._guarded_keys:
                continue
            self._guarded_keys[key] = reason
            while len(self._guarded_keys) > 4096:
                self._guarded_keys.popitem(last=False)
            log.warning(
                f"chameleon drift guard: adapter {key} served on the base model ({reason})",
                extra={"adapter": key, "reason": reason, "max_delta_ratio": self.config.max_delta_ratio},
            )

    def _write_audit(self, result: BatchAdaptation, rows: int, request_ids: Sequence[str] | None) -> None:
        names = list(request_ids) if request_ids is not None else list(range(rows))
        entries = []
        for i, name in enumerate(names):
            if not result.adapted:
                entries.append(audit_row(name, None, result.fallback_reason))
            elif i in result.guarded:
                entries.append(audit_row(name, None, f"guarded:{result.guarded[i]}"))
            else:
                entries.append(audit_row(name, result.keys[int(result.assignments[i])]))
        outcome = "adapted" if result.adapted else "fallback"
        self.audit.write_batch(self.manifest, entries, self._norms, outcome=outcome)

    def _prepare(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        result: BatchAdaptation,
        request_ids: Sequence[str] | None = None,
    ) -> BatchBank:
        self._ensure_manifest()
        manifest = self.manifest
        device = self.model.get_input_embeddings().weight.device
        stats = compute_statistic(  # the shared function, as the trainer computed it
            self.model,
            manifest.statistic,
            input_ids.to(device),
            None if attention_mask is None else attention_mask.to(device),
            tokenizer=self.tokenizer,
        )
        held = self.cache.keys(self.config.max_held_keys)
        called = time.perf_counter()
        try:
            answer = self.client.adapt(
                stats,
                request_ids=request_ids,
                policy=self._policy(input_ids.shape[0]),
                dtype=self._wire_dtype(),
                held_keys=held,
                timeout=self.config.deadline_s,
                compact=self.config.compact,
                rebuild=False,  # a compact answer is applied as bases + per-row weights (_install_compact)
            )
        except (AdapterServiceError, InvalidResponse) as exc:
            raise sidecar_fallback(exc) from exc
        finally:
            self.metrics.sidecar_seconds.observe(time.perf_counter() - called)
        if answer.artifact_id != manifest.artifact_id:
            self._ensure_manifest(answer.artifact_id)
            raise Fallback("manifest_mismatch", f"the service switched to artifact {answer.artifact_id}")
        result.assignments = answer.assignments
        result.k = answer.k
        result.keys = tuple(c.key for c in answer.clusters)
        bank = self._install(answer, input_ids.shape[0])
        bank.guard = RowGuard(bank.rows, device, self.config.max_delta_ratio, attention_mask)
        return bank

    def _install(self, answer: AdaptResult, rows: int) -> BatchBank:
        """Per-cluster factors -> one stacked (A_cat, B_cat) per module and the row mask."""
        if answer.bases_key:
            return self._install_compact(answer, rows)
        manifest = self.manifest
        weight = self.model.get_input_embeddings().weight
        device, dtype = weight.device, weight.dtype
        adapters = []
        for cluster in answer.clusters:
            if cluster.omitted:
                cached = self.cache.get(cluster.key)
                if cached is None:
                    raise Fallback("cache_miss", f"adapter {cluster.key} was left out but is not cached")
                self.metrics.adapters.labels("cache").inc()
            else:
                cached = self.cache.put(
                    cluster.key,
                    self._to_device(cluster.modules, cluster.key, device, dtype, manifest.scaling),
                )
                self.metrics.adapters.labels("sidecar").inc()
            if self.audit is not None and cluster.key not in self._norms:
                self._remember_norms(cluster.key, {n: (a, b, None) for n, (a, b) in cached.modules.items()})
            adapters.append(cached)
        self.metrics.cache_bytes.set(self.cache.nbytes)
        factors = {}
        for name, _, _ in manifest.targets:
            a_cat = torch.cat([a.modules[name][0] for a in adapters], dim=1)
            b_cat = torch.cat([a.modules[name][1] for a in adapters], dim=0)
            factors[name] = (a_cat, b_cat)
        r, k = manifest.rank, answer.k
        if k == 1:
            row_mask = None
        else:
            assignments = torch.as_tensor(answer.assignments, dtype=torch.long, device=device)
            slot = torch.arange(k * r, device=device) // r
            row_mask = (slot[None, :] == assignments[:, None]).to(dtype)
        return BatchBank(row_mask=row_mask, rows=rows, factors=factors)

    def _install_compact(self, answer: AdaptResult, rows: int) -> BatchBank:
        """A mixture in the compact form is one rank-r LoRA whose B columns are weighted per row: the
        bank holds the bases once and the row mask carries each row's column weights, so the hooks
        compute s B diag(w_c) (A x) = s B_c (A_c x) at the cost of k = 1, whatever k is."""
        manifest = self.manifest
        weight = self.model.get_input_embeddings().weight
        device, dtype = weight.device, weight.dtype
        if answer.bases is not None:
            modules = self._to_device(answer.bases, answer.bases_key, device, dtype, manifest.scaling)
            bases = self.cache.put(
                answer.bases_key, {n: (a.contiguous(), b.contiguous()) for n, (a, b) in modules.items()}
            )
            self.metrics.adapters.labels("sidecar").inc()
        else:
            bases = self.cache.get(answer.bases_key)
            if bases is None:
                raise Fallback("cache_miss", f"bases {answer.bases_key} were left out but are not cached")
            self.metrics.adapters.labels("cache").inc()
        weights = []
        for cluster in answer.clusters:
            if cluster.omitted:
                cached = self.cache.get(cluster.key)
                if cached is None or cached.weights is None:
                    raise Fallback("cache_miss", f"adapter {cluster.key} was left out but is not cached")
                self.metrics.adapters.labels("cache").inc()
            else:
                w = torch.from_numpy(cluster.weights).to(device=device, dtype=dtype)
                cached = self.cache.put(cluster.key, {}, weights=w)
                self.metrics.adapters.labels("sidecar").inc()
            weights.append(cached.weights)
        self.metrics.cache_bytes.set(self.cache.nbytes)
        columns = column_weights(torch.stack(weights), manifest.rank)  # [k, r]
        if self.audit is not None:
            for cluster, c in zip(answer.clusters, columns, strict=True):
                if cluster.key not in self._norms:
                    self._remember_norms(cluster.key, {n: (a, b, c) for n, (a, b) in bases.modules.items()})
        assignments = torch.as_tensor(answer.assignments, dtype=torch.long, device=device)
        return BatchBank(row_mask=columns[assignments], rows=rows, factors=bases.modules)

    def _remember_norms(self, key: str, modules: dict[str, tuple[Any, Any, Any]]) -> None:
        """||s B A||_F / ||W||_F of one adapter (overall and its largest module), once per key.

        From r x r Gram matrices: ||A^T C (sB^T)||_F^2 = sum((C G_a C) * G_b) with G_a = A A^T,
        G_b = (sB^T)(sB^T)^T and C the compact form's column weights (identity for whole adapters), so
        no d_out x d_in product is formed."""
        if not self._weight_sq:
            targets = dict(self.model.named_modules())
            self._weight_sq = {
                name: float(targets[name].weight.detach().float().square().sum())
                for name, _, _ in self.manifest.targets
            }
        delta_sq = {}
        for name, (a_t, b_t, columns) in modules.items():
            g_a = a_t.float().t() @ a_t.float()
            g_b = b_t.float() @ b_t.float().t()
            if columns is not None:
                c = columns.float()
                g_a = c[:, None] * g_a * c[None, :]
            delta_sq[name] = float((g_a * g_b).sum())
        self._norms[key] = adapter_norms(delta_sq, self._weight_sq)
        while len(self._norms) > 4096:
            self._norms.popitem(last=False)

    @staticmethod
    def _to_device(modules, key: str, device: torch.device, dtype: torch.dtype, scaling: float):
        """(A^T, s B^T) per module, as views: the per-batch torch.cat makes them contiguous."""
        factors = {}
        for name, delta in modules.items():
            a = codec.to_torch(delta.a, device=device, dtype=dtype)
            b = codec.to_torch(delta.b, device=device, dtype=dtype)
            factors[name] = lora_factors(a, b, scaling)
        # One check per adapter: NaN and Inf survive a sum (and so does an overflow, equally unusable).
        total = torch.stack([a.sum() + b.sum() for a, b in factors.values()]).sum()
        if not torch.isfinite(total):
            raise Fallback("invalid_response", f"non-finite values in adapter {key}")
        return factors

    def _policy(self, rows: int) -> ClusteringPolicy:
        if self.config.policy is not None:
            return self.config.policy
        if self.manifest.mixture_bases and self.config.compact is not False:
            return PerRequest() if rows <= self.manifest.max_clusters else FixedK(self.manifest.max_clusters)
        return AutoK(max_k=8)

    def _wire_dtype(self) -> str:
        if self.config.wire_dtype is not None:
            return self.config.wire_dtype
        return "bfloat16" if self.model.get_input_embeddings().weight.dtype == torch.bfloat16 else "float16"

    def _count_fallback(self, result: BatchAdaptation, reason: str, detail: str) -> None:
        result.fallback_reason = reason
        self.metrics.batches.labels("fallback").inc()
        self.metrics.fallbacks.labels(reason).inc()
        self._log.fallback(reason, detail)

    # -- lifecycle --------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove every hook: the model computes exactly what it did before attach."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        self.cache.clear()
        self._detached = True


def attach(
    model: nn.Module,
    client: AdapterClient,
    config: PluginConfig | None = None,
    metrics: PluginMetrics | None = None,
    tokenizer: Any = None,
) -> AdapterHandle:
    """Check `model` against the service's manifest and hook its target modules.

    `tokenizer` (the model's) is needed only for an artifact with a sentence-encoder statistic.

    Raises ManifestMismatch when the artifact was made for another model. When the service cannot
    be reached, the handle is returned anyway: batches run on the base model (counted as
    `no_manifest`) until the service answers, and the model is checked then.
    """
    config = config or PluginConfig()
    handle = AdapterHandle(model, client, config, metrics, tokenizer)
    try:
        manifest = client.manifest(timeout=config.manifest_timeout_s, refresh=True)
    except AdapterServiceError as exc:
        log.warning(
            "adapter service unreachable at attach; serving the base model until it answers",
            extra={"address": client.address, "error": str(exc)},
        )
        return handle
    handle._install_manifest(manifest)
    return handle
