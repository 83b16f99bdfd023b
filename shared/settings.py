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
    # --- request parsing limits (shared/options.py, shared/http_api.py) ---
    max_request_bytes: int = 100 * MIB  # the Functions host's own request-size limit
    max_multipart_parts: int = 64
    max_part_header_bytes: int = 8 * 1024
    max_prompt_chars: int = 20_000
    max_schema_bytes: int = 64 * 1024
    max_json_depth: int = 64
    max_json_items: int = 100_000  # values in one JSON document (body, schema, labels, folder config)
    max_labels: int = 100  # raising these two past 100 has no effect: task_schemas caps classify's schema at 100 x 100
    max_label_chars: int = 100
    max_pages_spec_chars: int = 100
    max_tokens_limit: int = 16_384  # the largest max_tokens a caller may ask for
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
            # --- request parsing limits ---
            max_request_bytes=r.integer("MAX_REQUEST_BYTES", 100 * MIB, minimum=1),
            max_multipart_parts=r.integer("MAX_MULTIPART_PARTS", 64, minimum=1),
            max_part_header_bytes=r.integer("MAX_PART_HEADER_BYTES", 8 * 1024, minimum=256),
            max_prompt_chars=r.integer("MAX_PROMPT_CHARS", 20_000, minimum=1),
            max_schema_bytes=r.integer("MAX_SCHEMA_BYTES", 64 * 1024, minimum=2),
            max_json_depth=r.integer("MAX_JSON_DEPTH", 64, minimum=4),
            max_json_items=r.integer("MAX_JSON_ITEMS", 100_000, minimum=16),
            max_labels=r.integer("MAX_LABELS", 100, minimum=1),
            max_label_chars=r.integer("MAX_LABEL_CHARS", 100, minimum=1),
            max_pages_spec_chars=r.integer("MAX_PAGES_SPEC_CHARS", 100, minimum=1),
            max_tokens_limit=r.integer("MAX_TOKENS_LIMIT", 16_384, minimum=1),
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
