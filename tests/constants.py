"""Names the tests share. A model or deployment name here is a fixture value, not a claim about any model."""

TEST_DEPLOYMENT = "gpt-4o"  # the deployment name tests configure (VLM_DEPLOYMENT); the local stand-in takes any name
