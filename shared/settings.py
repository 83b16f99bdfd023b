"""Every setting the service reads, in one place (the only module that reads the environment).

`Settings.from_env()` builds an immutable value from a mapping (the process
environment by default) and fails with a `ConfigurationError` naming the variable
when something required is missing or malformed. Everything else receives the
`Settings` object; nothing else touches `os.environ`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from .errors import ConfigurationError

MIB = 1024 * 1024
STORAGE_CONNECTION = "VlmStorage"
DETAILS = ("low", "high", "auto")


@dataclass(frozen=True)
class ModelTarget:
    """One place a chat completion can be sent: an endpoint and a deployment (model) name."""

    endpoint: str
    deployment: str
    api_key: str | None = None

    @property
    def is_azure(self) -> bool:
        host = self.endpoint.split("://", 1)[-1].split("/", 1)[0].lower()
        return host.endswith((".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com"))

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


@dataclass(frozen=True)
class Settings:
    vlm_endpoint: str
    storage: StorageSettings
    vlm_api_key: str | None = None
    vlm_deployment: str = "gpt-4o"
    vlm_model: str | None = None  # model family for token/price estimates; defaults to the deployment
    vlm_fallback_deployments: tuple[ModelTarget, ...] = ()
    vlm_rpm: int = 0
    vlm_tpm: int = 0
    vlm_rate_window_s: float = 60.0  # the limiter's burst: rate x window (Azure checks over 1-10 s windows)
    vlm_timeout_s: float = 60.0
    vlm_max_retries: int = 3
    request_budget_s: float = 180.0
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
    extra: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def primary(self) -> ModelTarget:
        return ModelTarget(self.vlm_endpoint, self.vlm_deployment, self.vlm_api_key)

    @property
    def model_targets(self) -> tuple[ModelTarget, ...]:
        """The primary, then each fallback, in the order they are tried."""
        return (self.primary, *self.vlm_fallback_deployments)

    @property
    def model_family(self) -> str:
        return self.vlm_model or self.vlm_deployment

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
            vlm_deployment=r.optional("VLM_DEPLOYMENT") or "gpt-4o",
            vlm_model=r.optional("VLM_MODEL"),
            vlm_fallback_deployments=_parse_fallbacks(r.optional("VLM_FALLBACK_DEPLOYMENTS"), endpoint, api_key),
            vlm_rpm=r.integer("VLM_RPM", 0),
            vlm_tpm=r.integer("VLM_TPM", 0),
            vlm_rate_window_s=r.number("VLM_RATE_WINDOW_S", 60.0),
            vlm_timeout_s=r.number("VLM_TIMEOUT_S", 60.0),
            vlm_max_retries=r.integer("VLM_MAX_RETRIES", 3),
            request_budget_s=r.number("VLM_REQUEST_BUDGET_S", 180.0),
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
            default_task=r.optional("DEFAULT_TASK") or "describe",
            default_detail=default_detail,
            cache_memory_items=r.integer("CACHE_MEMORY_ITEMS", 256),
            sequence_concurrency=r.integer("SEQUENCE_CONCURRENCY", 4, minimum=1),
            task_config_ttl_s=r.number("TASK_CONFIG_TTL_S", 30.0),
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
        )


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def optional(self, name: str) -> str | None:
        value = self.env.get(name)
        return value.strip() if value and value.strip() else None

    def required(self, name: str) -> str:
        value = self.optional(name)
        if value is None:
            raise ConfigurationError(f"setting {name} is required but not set", details={"variable": name})
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


def _parse_fallbacks(raw: str | None, endpoint: str, api_key: str | None) -> tuple[ModelTarget, ...]:
    """`dep2, https://other.openai.azure.com|dep3` -> targets; bare names share the primary endpoint."""
    if not raw:
        return ()
    targets = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        if "|" in item:
            other, deployment = (p.strip() for p in item.rsplit("|", 1))
            if not other.startswith(("http://", "https://")) or not deployment:
                raise ConfigurationError(
                    f"VLM_FALLBACK_DEPLOYMENTS entry {item!r} must be 'deployment' or 'https://endpoint|deployment'",
                    details={"variable": "VLM_FALLBACK_DEPLOYMENTS"},
                )
            # another endpoint uses Entra ID (or the same key only if it is the same endpoint)
            same = other.rstrip("/") == endpoint
            targets.append(ModelTarget(other.rstrip("/"), deployment, api_key if same else None))
        else:
            targets.append(ModelTarget(endpoint, item, api_key))
    return tuple(targets)


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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once on first use (not at import time)."""
    return Settings.from_env()
