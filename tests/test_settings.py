"""Settings: DESIGN.md's names and defaults, and clear failures naming the variable."""

import pytest

from shared.errors import ConfigurationError
from shared.settings import ModelTarget, Settings
from tests.constants import TEST_DEPLOYMENT, TEST_FALLBACK_MODEL

BASE = {
    "VLM_ENDPOINT": "http://127.0.0.1:8089/v1",
    "VlmStorage": "UseDevelopmentStorage=true",
    "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
}


def test_defaults_match_design():
    s = Settings.from_env(BASE)
    assert s.vlm_deployment == TEST_DEPLOYMENT
    assert (s.vlm_rpm, s.vlm_tpm) == (0, 0)
    assert (s.vlm_timeout_s, s.vlm_max_retries) == (60.0, 3)
    assert (s.images_container, s.results_container, s.cache_container, s.schemas_container) == (
        "images",
        "results",
        "cache",
        "schemas",
    )
    assert s.max_image_bytes == 20 * 1024 * 1024
    assert s.max_image_pixels == 50_000_000
    assert s.max_images_per_request == 10
    assert (s.default_task, s.default_detail) == ("describe", "auto")
    assert s.vlm_fallback_deployments == ()


@pytest.mark.parametrize("missing", ["VLM_ENDPOINT", "VlmStorage", "VLM_DEPLOYMENT"])
def test_missing_required_setting_names_the_variable(missing):
    env = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(env)
    assert missing in info.value.message
    assert info.value.details["variable"] == missing


def test_identity_based_storage_is_enough():
    env = {
        "VLM_ENDPOINT": "https://x.openai.azure.com",
        "VLM_DEPLOYMENT": TEST_DEPLOYMENT,
        "VlmStorage__blobServiceUri": "https://acct.blob.core.windows.net",
        "VlmStorage__queueServiceUri": "https://acct.queue.core.windows.net",
        "VlmStorage__credential": "managedidentity",
        "VlmStorage__clientId": "abc",
    }
    s = Settings.from_env(env)
    assert s.storage.connection_string is None
    assert s.storage.blob_service_uri == "https://acct.blob.core.windows.net"
    assert s.storage.client_id == "abc"
    assert s.primary.is_azure


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("VLM_RPM", "many"),
        ("VLM_TIMEOUT_S", "-1"),
        ("MAX_IMAGE_BYTES", "0"),
        ("DEFAULT_DETAIL", "ultra"),
        ("DEFAULT_TASK", "descibe"),
        ("VLM_RATE_SPLIT", "-1"),
        ("VLM_RATE_SPLIT", "eight"),
    ],
)
def test_malformed_setting_names_the_variable(name, value):
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({**BASE, name: value})
    assert name in info.value.message


def test_default_task_is_normalised_like_a_requests_task():
    assert Settings.from_env({**BASE, "DEFAULT_TASK": " OCR "}).default_task == "ocr"
    assert Settings.from_env(BASE).default_task == "describe"


def test_fallback_chain_parsing():
    s = Settings.from_env(
        {
            **BASE,
            "VLM_API_KEY": "k",
            "VLM_FALLBACK_DEPLOYMENTS": f"{TEST_FALLBACK_MODEL}, https://other.openai.azure.com|{TEST_DEPLOYMENT}",
        }
    )
    assert s.model_targets == (
        ModelTarget("http://127.0.0.1:8089/v1", TEST_DEPLOYMENT, "k"),
        ModelTarget("http://127.0.0.1:8089/v1", TEST_FALLBACK_MODEL, "k"),
        ModelTarget("https://other.openai.azure.com", TEST_DEPLOYMENT, None),
    )
    with pytest.raises(ConfigurationError, match="VLM_FALLBACK_DEPLOYMENTS"):
        Settings.from_env({**BASE, "VLM_FALLBACK_DEPLOYMENTS": "ftp://x|y"})


def test_only_settings_reads_the_environment():
    """Nothing outside shared/settings.py reads os.environ / getenv (local/ stand-ins excepted)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = []
    for path in [*root.glob("shared/*.py"), *root.glob("*/__init__.py")]:
        if path.name == "settings.py" or ".venv" in path.parts:
            continue
        if re.search(r"os\.environ|getenv\(", path.read_text()):
            offenders.append(str(path.relative_to(root)))
    assert offenders == []


@pytest.mark.parametrize(
    ("endpoint", "azure"),
    [
        ("https://x.openai.azure.com", True),
        ("https://vlm-gw.azure-api.net", True),  # the API Management gateway (useApim): v1 path, Entra ID
        ("http://127.0.0.1:8089/v1", False),
        ("https://azure-api.net.example.com", False),
    ],
)
def test_azure_endpoints_and_the_gateway_get_the_v1_path_and_entra_id(endpoint, azure):
    from shared.model import base_url_for

    target = Settings.from_env({**BASE, "VLM_ENDPOINT": endpoint}).primary
    assert target.is_azure is azure
    assert base_url_for(target).endswith("/openai/v1/") is azure


@pytest.mark.parametrize("limits", ["OptionLimits", "SchemaBudget", "ImageLimits", "HttpLimits"])
def test_limits_classes_mirror_their_settings_in_one_place(limits: str) -> None:
    """Every field of a limits class is a setting: same default, and `from_settings` carries any value."""
    import dataclasses

    from shared.http_api import HttpLimits
    from shared.images import ImageLimits
    from shared.options import OptionLimits
    from shared.schema_guard import SchemaBudget

    cls = {
        "OptionLimits": OptionLimits,
        "SchemaBudget": SchemaBudget,
        "ImageLimits": ImageLimits,
        "HttpLimits": HttpLimits,
    }[limits]
    computed = {"max_images", "options"} if cls is HttpLimits else set()  # derived, not one setting each
    mirrored = {f.name: f.metadata.get("setting") for f in dataclasses.fields(cls) if f.name not in computed}
    assert None not in mirrored.values(), f"{limits} fields that mirror no setting: {mirrored}"
    defaults = Settings.from_env(BASE)
    extra = {n: getattr(cls.from_settings(defaults), n) for n in computed}
    assert cls.from_settings(defaults) == cls(**extra)
    bumped = dataclasses.replace(defaults, **{s: getattr(defaults, s) + 7 for s in mirrored.values()})
    expected = cls(**{f: getattr(defaults, s) + 7 for f, s in mirrored.items()}, **extra)
    got = cls.from_settings(bumped)
    assert dataclasses.replace(got, **extra) == expected


def test_from_env_defaults_are_the_dataclass_defaults() -> None:
    """An unset variable gives the field's default: the two places a default is written agree."""
    from shared.settings import StorageSettings

    s = Settings.from_env(BASE)
    fresh = Settings(vlm_endpoint=s.vlm_endpoint, storage=s.storage, vlm_deployment=s.vlm_deployment)
    assert isinstance(s.storage, StorageSettings)
    assert s == fresh
