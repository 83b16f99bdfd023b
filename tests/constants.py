"""Names the tests share.

No model is assumed anywhere in the product's code (VLM_DEPLOYMENT is a required setting, the model
comes from VLM_MODEL or the first answer, its numbers from shared/model_catalog.json). Tests still
need names: these are fixture values, kept in one place. The model named here is a catalog family
whose image tokens are tiles (85 + 170 per 512 px tile), which the token figures in tests rely on;
it is retired, which does not matter to a test.
"""

TEST_DEPLOYMENT = "vision-test"  # the deployment tests configure (VLM_DEPLOYMENT); not a model name on purpose
TEST_MODEL = "gpt-4o"  # the catalog family tests set as VLM_MODEL
TEST_MODEL_VERSION = "gpt-4o-2024-11-20"  # the dated name the fakes answer with (the answer's `model` field)
TEST_FALLBACK_MODEL = "gpt-4o-mini"  # a second catalog family, for fallback deployments
TEST_FALLBACK_MODEL_VERSION = "gpt-4o-mini-2024-07-18"
