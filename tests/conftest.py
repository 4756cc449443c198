"""Session-wide settings for the whole suite (topic folders add their own conftest.py)."""

from __future__ import annotations

import os

# 2 cores shared with Ray: one thread per torch/BLAS; never touch a model hub.
for _key, _value in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)
