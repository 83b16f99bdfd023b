"""Every setting the service reads, in one place (the only module that reads the environment).

`Settings.from_env()` builds an immutable value from a mapping (the process
environment by default) and fails with a `ConfigurationError` naming the variable
when something required is missing or malformed. Everything else receives the
`Settings` object; nothing else touches `os.environ`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from functools import lru_cache
from typing import Any, TypeVar

from .errors import ConfigurationError

MIB = 1024 * 1024
STORAGE_CONNECTION = "VlmStorage"
DETAILS = ("low", "high", "auto")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")  # ordered, cheapest first


@dataclass(frozen=True)
class ModelTarget:
    """One place a chat completion can be sent: an endpoint, a deployment name and, if known, its model.

    `model` is the model behind the deployment (VLM_MODEL, or a fallback's `=model`); when
    None the router learns it from the first answer's `model` field (shared/model.py).
    """

    endpoint: str
    deployment: str
    api_key: str | None = None
    model: str | None = None

    @property
    def is_azure(self) -> bool:
        """Azure OpenAI, or the optional API Management gateway in front of it (`useApim`): both take
        the v1 path `/openai/v1/` and an Entra ID token."""
        host = self.endpoint.split("://", 1)[-1].split("/", 1)[0].lower()
        return host.endswith(
            (".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com", ".azure-api.net")
        )

    @property
    def label(self) -> str:
        return self.deployment if not self.endpoint else f"{self.endpoint}|{self.deployment}"


@dataclass(frozen=True)
class StorageSettings:
    """The `VlmStorage` connection: a connection string locally, identity-based URIs in Azure."""

    connection_string: str | None = None
    blob_service_uri: str | None = None
    queue_service_uri: str | None = None
    credential: str | None = None  # "managedidentity" or None (DefaultAzureCredential)
    client_id: str | None = None


RATE_PEERS = ("storage", "off")


@dataclass(frozen=True)
class Settings:
    vlm_endpoint: str
    storage: StorageSettings
    vlm_deployment: str  # required: no model or deployment name is assumed in code
    vlm_api_key: str | None = None
    vlm_model: str | None = None  # the model behind the primary deployment; None: learned from answers
    vlm_fallback_deployments: tuple[ModelTarget, ...] = ()
    vlm_rpm: int = 0
    vlm_tpm: int = 0
    vlm_rate_window_s: float = 60.0  # the limiter's burst: rate x window (Azure checks over 1-10 s windows)
    vlm_rate_split: int = 0  # N > 0: each instance paces to 1/N of the bound, fixed (shared/limiter.py); 0: adaptive
    # "storage": count the busy instances in the app's storage account and pace each to 1/N (shared/peers.py);
    # "off": the adaptive share alone. A VLM_RATE_SPLIT above 0 takes precedence (a pinned count needs no counting).
    vlm_rate_peers: str = "storage"
    # The completion budget of a task no answer has been seen for yet (shared/reservations.py): a cut answer is
    # asked again at the caller's full budget. 0: reserve the caller's budget until answers are seen.
    vlm_budget_prior_tokens: int = 384
    vlm_timeout_s: float = 60.0
    vlm_max_retries: int = 3
    request_budget_s: float = 180.0
    # A throttled blob invocation waits out 429s this long before handing the blob back to the host; below
    # host.json's functionTimeout (10 min), leaving room for the call that finally goes through.
    blob_throttle_wait_s: float = 420.0
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    azure_client_id: str | None = None
    images_container: str = "images"
    results_container: str = "results"
    cache_container: str = "cache"
    schemas_container: str = "schemas"
    max_image_bytes: int = 20 * MIB
    max_image_pixels: int = 50_000_000
    max_images_per_request: int = 10
    max_pdf_pages: int = 20
    default_task: str = "describe"
    default_detail: str = "auto"
    cache_memory_items: int = 256
    sequence_concurrency: int = 4
    task_config_ttl_s: float = 30.0
    task_config_cache_items: int = 1024  # folders whose `_task.json` (or its absence) a worker remembers
    # --- image work budget (shared/images.py; README "Settings") ---
    # One image's pixels held at once: the decoded frame plus any full-size conversion
    # (bytes per pixel as Pillow stores the mode: 16-bit grey 2, RGB/RGBA 4, 16-bit -> 8-bit adds 8).
    max_decoded_bytes: int = 256 * MIB
    # Decoding work across one request: every image, page render and frame composited while seeking.
    max_request_decoded_bytes: int = 1024 * MIB
    # Frames/pages counted in a multi-frame TIFF/GIF/WebP before it is refused (counting has a cost too).
    max_frames: int = 1000
    # The smallest side an image may be sent with: a 20000x2 strip would reach the model as 512x1.
    min_image_side: int = 8
    # Images sent to the model for one request: every page, frame and strip counts.
    max_sent_images: int = 50
    # Requests preparing images at once per worker process: bounds decode memory (x MAX_DECODED_BYTES).
    prepare_concurrency: int = 2
    # blob names and folder files (issue 10): budgets checked from blob properties before any download
    max_manifest_images: int = 50  # images one _manifest.json may name (or its folder may hold)
    max_manifest_bytes: int = 64 * MIB  # their total size
    max_schema_blob_bytes: int = 256 * 1024  # a schema blob named in _task.json / _manifest.json
    # --- model catalog, reasoning models, calibration (issue 11) ---
    vlm_model_catalog: str | None = None  # a JSON file adding/overriding catalog families (shared/catalog.py)
    vlm_reasoning_effort: str = "low"  # reasoning_effort for every task unless the task or request says otherwise
    vlm_reasoning_effort_tasks: tuple[tuple[str, str], ...] = ()  # per-task overrides, e.g. (("compare", "medium"),)
    vlm_reasoning_allowance: int = 4096  # completion tokens added to max_tokens for reasoning models
    vlm_calibration_window: int = 20  # recent answers the per-deployment image-token correction is the median of
    # --- Global Batch route (issue 13; limits from docs/batch.md, Azure's published values) ---
    vlm_batch_deployment: str | None = None  # a GlobalBatch deployment of the same model; None: batch mode is off
    batch_max_requests_per_file: int = 100_000  # Azure: requests per batch input file
    batch_max_file_bytes: int = 200 * 1000 * 1000  # Azure: 200 MB per input file (files API upload)
    batch_max_files: int = 500  # Azure: batch files per resource (files API); older ones must be deleted
    batch_enqueued_tokens: int = 0  # the deployment's enqueued-token quota (its capacity); 0: unknown, not pre-checked
    batch_max_resubmits: int = 3  # an expired/failed/cancelled job's unfinished requests are resubmitted this often
    batch_submit_schedule: str = "0 */5 * * * *"  # NCRONTAB of the batch_submit timer (function.json reads it too)
    batch_collect_schedule: str = "30 */5 * * * *"  # NCRONTAB of the batch_collect timer
    # --- request parsing limits (shared/options.py, shared/http_api.py) ---
    max_request_bytes: int = 100 * MIB  # the Functions host's own request-size limit
    max_multipart_parts: int = 64
    max_part_header_bytes: int = 8 * 1024
    max_prompt_chars: int = 20_000
    max_json_depth: int = 64
    max_json_items: int = 100_000  # values in one JSON document (body, schema, labels, folder config)
    max_labels: int = 100  # raising these two past 100 has no effect: task_schemas caps classify's schema at 100 x 100
    max_label_chars: int = 100
    max_pages_spec_chars: int = 100
    max_tokens_limit: int = 16_384  # the largest max_tokens a caller may ask for
    # --- caller JSON Schemas and the answers validated against them (shared/schema_guard.py) ---
    schema_max_bytes: int = 64_000  # serialised size of one caller schema (meta-validation ~1 s at the limit)
    schema_max_nodes: int = 10_000  # JSON values (objects, arrays, scalars) in one schema
    schema_max_depth: int = 40  # JSON nesting of one schema
    schema_max_string_chars: int = 5_000  # any one string (key, description, pattern, enum value)
    schema_max_list_items: int = 1_000  # items of any one array in the schema
    schema_max_enum_items: int = 500  # values of one `enum`
    schema_max_enum_total: int = 2_000  # `enum` values in the whole schema
    schema_max_combinators: int = 200  # allOf/anyOf/oneOf/not keywords in the whole schema
    schema_max_validation_steps: int = 25_000  # keyword evaluations (and pruning steps) per answer check, ~1 s
    answer_max_nodes: int = 20_000  # JSON values in one structured answer
    answer_max_depth: int = 40  # JSON nesting of one structured answer
    # --- telemetry (issue 14; shared/telemetry.py) ---
    # Set in Azure by infra/modules/functionapp.bicep: spans and metrics go to Application Insights.
    applicationinsights_connection_string: str | None = None
    # "Authorization=AAD;ClientId=<uami>": ingestion authenticates with that managed identity (Entra).
    applicationinsights_authentication_string: str | None = None
    telemetry_dir: str | None = None  # VLM_TELEMETRY_DIR: local JSONL spans/metrics (`make run` sets .local/telemetry)
    telemetry_export_interval_ms: int = 10_000  # how often the local metric reader writes (the distro keeps its own)

    @property
    def primary(self) -> ModelTarget:
        return ModelTarget(self.vlm_endpoint, self.vlm_deployment, self.vlm_api_key, self.vlm_model)

    @property
    def model_targets(self) -> tuple[ModelTarget, ...]:
        """The primary, then each fallback, in the order they are tried."""
        return (self.primary, *self.vlm_fallback_deployments)

    def reasoning_effort_for(self, task: str) -> str:
        """The reasoning_effort a task runs with when the request does not name one."""
        return dict(self.vlm_reasoning_effort_tasks).get(task, self.vlm_reasoning_effort)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        r = _Reader(env)
        endpoint = r.required("VLM_ENDPOINT").rstrip("/")
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"VLM_ENDPOINT must be an http(s) URL, got {endpoint!r}",
                details={"variable": "VLM_ENDPOINT"},
            )
        api_key = r.optional("VLM_API_KEY")
        default_detail = r.choice("DEFAULT_DETAIL", DETAILS, "auto")
        return cls(
            vlm_endpoint=endpoint,
            vlm_api_key=api_key,
            vlm_deployment=r.required(
                "VLM_DEPLOYMENT", "the name of the deployment the app calls (azd sets it; locally: local.settings.json)"
            ),
            vlm_model=r.optional("VLM_MODEL"),
            vlm_fallback_deployments=_parse_fallbacks(r.optional("VLM_FALLBACK_DEPLOYMENTS"), endpoint, api_key),
            vlm_rpm=r.integer("VLM_RPM", 0),
            vlm_tpm=r.integer("VLM_TPM", 0),
            vlm_rate_window_s=r.number("VLM_RATE_WINDOW_S", 60.0),
            vlm_rate_split=r.integer("VLM_RATE_SPLIT", 0),
            vlm_rate_peers=r.choice("VLM_RATE_PEERS", RATE_PEERS, "storage"),
            vlm_budget_prior_tokens=r.integer("VLM_BUDGET_PRIOR_TOKENS", 384),
            vlm_timeout_s=r.number("VLM_TIMEOUT_S", 60.0),
            vlm_max_retries=r.integer("VLM_MAX_RETRIES", 3),
            request_budget_s=r.number("VLM_REQUEST_BUDGET_S", 180.0),
            blob_throttle_wait_s=r.number("BLOB_THROTTLE_WAIT_S", 420.0),
            breaker_failures=r.integer("VLM_BREAKER_FAILURES", 5, minimum=1),
            breaker_cooldown_s=r.number("VLM_BREAKER_COOLDOWN_S", 30.0),
            azure_client_id=r.optional("AZURE_CLIENT_ID"),
            storage=_storage(r),
            images_container=r.optional("IMAGES_CONTAINER") or "images",
            results_container=r.optional("RESULTS_CONTAINER") or "results",
            cache_container=r.optional("CACHE_CONTAINER") or "cache",
            schemas_container=r.optional("SCHEMAS_CONTAINER") or "schemas",
            max_image_bytes=r.integer("MAX_IMAGE_BYTES", 20 * MIB, minimum=1),
            max_image_pixels=r.integer("MAX_IMAGE_PIXELS", 50_000_000, minimum=1),
            max_images_per_request=r.integer("MAX_IMAGES_PER_REQUEST", 10, minimum=1),
            max_pdf_pages=r.integer("MAX_PDF_PAGES", 20, minimum=1),
            default_task=_default_task(r),
            default_detail=default_detail,
            cache_memory_items=r.integer("CACHE_MEMORY_ITEMS", 256),
            sequence_concurrency=r.integer("SEQUENCE_CONCURRENCY", 4, minimum=1),
            task_config_ttl_s=r.number("TASK_CONFIG_TTL_S", 30.0),
            task_config_cache_items=r.integer("TASK_CONFIG_CACHE_ITEMS", 1024, minimum=1),
            # image work budget
            max_decoded_bytes=r.integer("MAX_DECODED_BYTES", 256 * MIB, minimum=1),
            max_request_decoded_bytes=r.integer("MAX_REQUEST_DECODED_BYTES", 1024 * MIB, minimum=1),
            max_frames=r.integer("MAX_FRAMES", 1000, minimum=1),
            min_image_side=r.integer("MIN_IMAGE_SIDE", 8, minimum=1),
            max_sent_images=r.integer("MAX_SENT_IMAGES", 50, minimum=1),
            prepare_concurrency=r.integer("PREPARE_CONCURRENCY", 2, minimum=1),
            # blob names and folder files
            max_manifest_images=r.integer("MAX_MANIFEST_IMAGES", 50, minimum=1),
            max_manifest_bytes=r.integer("MAX_MANIFEST_BYTES", 64 * MIB, minimum=1),
            max_schema_blob_bytes=r.integer("MAX_SCHEMA_BLOB_BYTES", 256 * 1024, minimum=1),
            # --- model catalog, reasoning models, calibration (issue 11) ---
            vlm_model_catalog=r.optional("VLM_MODEL_CATALOG"),
            **_reasoning_efforts(r.optional("VLM_REASONING_EFFORT")),
            vlm_reasoning_allowance=r.integer("VLM_REASONING_ALLOWANCE", 4096),
            vlm_calibration_window=r.integer("VLM_CALIBRATION_WINDOW", 20, minimum=1),
            vlm_batch_deployment=r.optional("VLM_BATCH_DEPLOYMENT"),
            batch_max_requests_per_file=r.integer("BATCH_MAX_REQUESTS_PER_FILE", 100_000, minimum=1),
            batch_max_file_bytes=r.integer("BATCH_MAX_FILE_BYTES", 200 * 1000 * 1000, minimum=1024),
            batch_max_files=r.integer("BATCH_MAX_FILES", 500, minimum=1),
            batch_enqueued_tokens=r.integer("BATCH_ENQUEUED_TOKENS", 0),
            batch_max_resubmits=r.integer("BATCH_MAX_RESUBMITS", 3),
            batch_submit_schedule=r.optional("BATCH_SUBMIT_SCHEDULE") or "0 */5 * * * *",
            batch_collect_schedule=r.optional("BATCH_COLLECT_SCHEDULE") or "30 */5 * * * *",
            # --- request parsing limits ---
            max_request_bytes=r.integer("MAX_REQUEST_BYTES", 100 * MIB, minimum=1),
            max_multipart_parts=r.integer("MAX_MULTIPART_PARTS", 64, minimum=1),
            max_part_header_bytes=r.integer("MAX_PART_HEADER_BYTES", 8 * 1024, minimum=256),
            max_prompt_chars=r.integer("MAX_PROMPT_CHARS", 20_000, minimum=1),
            max_json_depth=r.integer("MAX_JSON_DEPTH", 64, minimum=4),
            max_json_items=r.integer("MAX_JSON_ITEMS", 100_000, minimum=16),
            max_labels=r.integer("MAX_LABELS", 100, minimum=1),
            max_label_chars=r.integer("MAX_LABEL_CHARS", 100, minimum=1),
            max_pages_spec_chars=r.integer("MAX_PAGES_SPEC_CHARS", 100, minimum=1),
            max_tokens_limit=r.integer("MAX_TOKENS_LIMIT", 16_384, minimum=1),
            # --- caller JSON Schemas (shared/schema_guard.py) ---
            schema_max_bytes=r.integer("SCHEMA_MAX_BYTES", 64_000, minimum=1),
            schema_max_nodes=r.integer("SCHEMA_MAX_NODES", 10_000, minimum=1),
            schema_max_depth=r.integer("SCHEMA_MAX_DEPTH", 40, minimum=1),
            schema_max_string_chars=r.integer("SCHEMA_MAX_STRING_CHARS", 5_000, minimum=1),
            schema_max_list_items=r.integer("SCHEMA_MAX_LIST_ITEMS", 1_000, minimum=1),
            schema_max_enum_items=r.integer("SCHEMA_MAX_ENUM_ITEMS", 500, minimum=1),
            schema_max_enum_total=r.integer("SCHEMA_MAX_ENUM_TOTAL", 2_000, minimum=1),
            schema_max_combinators=r.integer("SCHEMA_MAX_COMBINATORS", 200, minimum=0),
            schema_max_validation_steps=r.integer("SCHEMA_MAX_VALIDATION_STEPS", 25_000, minimum=1),
            answer_max_nodes=r.integer("ANSWER_MAX_NODES", 20_000, minimum=1),
            answer_max_depth=r.integer("ANSWER_MAX_DEPTH", 40, minimum=1),
            applicationinsights_connection_string=r.optional("APPLICATIONINSIGHTS_CONNECTION_STRING"),
            applicationinsights_authentication_string=r.optional("APPLICATIONINSIGHTS_AUTHENTICATION_STRING"),
            telemetry_dir=r.optional("VLM_TELEMETRY_DIR"),
            telemetry_export_interval_ms=r.integer("VLM_TELEMETRY_EXPORT_INTERVAL_MS", 10_000, minimum=100),
        )


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def optional(self, name: str) -> str | None:
        value = self.env.get(name)
        return value.strip() if value and value.strip() else None

    def required(self, name: str, what: str = "") -> str:
        value = self.optional(name)
        if value is None:
            hint = f": {what}" if what else ""
            raise ConfigurationError(f"setting {name} is required but not set{hint}", details={"variable": name})
        return value

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigurationError(
                f"setting {name} must be an integer, got {raw!r}", details={"variable": name}
            ) from None
        if value < minimum:
            raise ConfigurationError(f"setting {name} must be >= {minimum}, got {value}", details={"variable": name})
        return value

    def number(self, name: str, default: float) -> float:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigurationError(
                f"setting {name} must be a number, got {raw!r}", details={"variable": name}
            ) from None
        if value <= 0:
            raise ConfigurationError(f"setting {name} must be > 0, got {value}", details={"variable": name})
        return value

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.optional(name) or default
        if value not in allowed:
            raise ConfigurationError(
                f"setting {name} must be one of {', '.join(allowed)}, got {value!r}", details={"variable": name}
            )
        return value


def _default_task(r: _Reader) -> str:
    """DEFAULT_TASK, checked at start: a typo would otherwise turn every request that names no task into an error."""
    from .tasks import TASKS  # lazily: the task registry pulls in the model layer, which reads these settings

    value = (r.optional("DEFAULT_TASK") or "describe").lower()
    if value not in TASKS:
        raise ConfigurationError(
            f"setting DEFAULT_TASK must be one of {', '.join(TASKS)}, got {value!r}",
            details={"variable": "DEFAULT_TASK"},
        )
    return value


def _parse_fallbacks(raw: str | None, endpoint: str, api_key: str | None) -> tuple[ModelTarget, ...]:
    """`dep2=gpt-5.4-nano, https://other.openai.azure.com|dep3` -> targets.

    Bare names share the primary endpoint; the optional `=model` names the model behind the
    deployment (else it is learned from the first answer).
    """
    if not raw:
        return ()
    targets = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        other, _, named = item.rpartition("|")
        deployment, _, model = (p.strip() for p in named.partition("="))
        other = other.strip().rstrip("/")
        if not deployment or ("=" in named and not model) or (other and not other.startswith(("http://", "https://"))):
            raise ConfigurationError(
                f"VLM_FALLBACK_DEPLOYMENTS entry {item!r} must be 'deployment[=model]' or "
                "'https://endpoint|deployment[=model]'",
                details={"variable": "VLM_FALLBACK_DEPLOYMENTS"},
            )
        if "|" in item and not other:
            raise ConfigurationError(
                f"VLM_FALLBACK_DEPLOYMENTS entry {item!r} has an empty endpoint",
                details={"variable": "VLM_FALLBACK_DEPLOYMENTS"},
            )
        # another endpoint uses Entra ID (or the same key only if it is the same endpoint)
        target_endpoint = other or endpoint
        key = api_key if target_endpoint == endpoint else None
        targets.append(ModelTarget(target_endpoint, deployment, key, model or None))
    return tuple(targets)


def _reasoning_efforts(raw: str | None) -> dict[str, object]:
    """VLM_REASONING_EFFORT: `low` (every task) or `low,compare=medium` (a default, then per-task values)."""
    default, per_task = "low", []
    for item in (p.strip() for p in (raw or "").split(",")):
        if not item:
            continue
        task, _, value = item.rpartition("=")
        if value not in REASONING_EFFORTS or (task == "" and "=" in item):
            raise ConfigurationError(
                f"setting VLM_REASONING_EFFORT: {item!r} must be one of {', '.join(REASONING_EFFORTS)}, "
                "optionally as task=value",
                details={"variable": "VLM_REASONING_EFFORT"},
            )
        if task:
            per_task.append((task.strip(), value))
        else:
            default = value
    return {"vlm_reasoning_effort": default, "vlm_reasoning_effort_tasks": tuple(per_task)}


def _storage(r: _Reader) -> StorageSettings:
    conn = r.optional(STORAGE_CONNECTION)
    blob_uri = r.optional(f"{STORAGE_CONNECTION}__blobServiceUri") or r.optional(f"{STORAGE_CONNECTION}__serviceUri")
    if conn is None and blob_uri is None:
        raise ConfigurationError(
            f"storage is not configured: set {STORAGE_CONNECTION} (a connection string, e.g. "
            f"UseDevelopmentStorage=true) or {STORAGE_CONNECTION}__blobServiceUri (managed identity)",
            details={"variable": STORAGE_CONNECTION},
        )
    return StorageSettings(
        connection_string=conn,
        blob_service_uri=blob_uri,
        queue_service_uri=r.optional(f"{STORAGE_CONNECTION}__queueServiceUri"),
        credential=r.optional(f"{STORAGE_CONNECTION}__credential"),
        client_id=r.optional(f"{STORAGE_CONNECTION}__clientId"),
    )


_L = TypeVar("_L")


def mirror(setting: str) -> Any:
    """A field of a limits dataclass (OptionLimits, SchemaBudget, ImageLimits) that is `Settings.<setting>`:
    its default is that setting's default, and `from_settings` fills it. Each limit's default lives in
    one place (the Settings field) and no class copies settings field by field."""
    default = Settings.__dataclass_fields__[setting].default
    if isinstance(default, Field) or default is None:  # dataclasses' MISSING, or a setting without a value
        raise TypeError(f"Settings.{setting} has no default to mirror")
    return field(default=default, metadata={"setting": setting})


def from_settings(cls: type[_L], settings: Settings, **computed: Any) -> _L:
    """An instance of a limits dataclass: every `mirror` field from its setting, the rest from `computed`."""
    mirrored = {f.name: getattr(settings, f.metadata["setting"]) for f in fields(cls) if "setting" in f.metadata}  # type: ignore[arg-type]
    return cls(**mirrored, **computed)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once on first use (not at import time)."""
    return Settings.from_env()
