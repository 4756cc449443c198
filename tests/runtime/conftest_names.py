"""Serve application names the runtime tests deploy (shared by conftest and tests)."""

from ndif_operator.api.naming import model_app_name

MODEL_APP = model_app_name("default", "tiny-llama")
SLOW_APP = model_app_name("default", "tiny-slow")
