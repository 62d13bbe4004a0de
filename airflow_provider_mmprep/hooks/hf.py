"""``airflow_provider_mmprep.hooks.hf``, kept for code that imports the hook from here."""

from ..airflow.hooks import HuggingFaceHubHook  # noqa: F401
