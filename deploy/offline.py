"""Nothing phones home: the environment every fedshield entry point sets before Flower,
Ray or transformers is imported (each reads its switch at import or start-up time), and
that every Flower child process inherits.

    import fedshield.deploy.offline  # noqa: F401  (first import of an entry point)

Flower 1.41 sends telemetry events unless FLWR_TELEMETRY_ENABLED=0 (flwr/supercore/
telemetry.py) and checks for updates unless FLWR_DISABLE_UPDATE_CHECK=1
(flwr/supercore/update_check.py); Ray reports usage stats unless RAY_USAGE_STATS_ENABLED=0;
Hugging Face libraries would look up the hub unless offline; MLflow (output.tracking=mlflow)
sends usage telemetry unless MLFLOW_DISABLE_TELEMETRY or DO_NOT_TRACK is true
(mlflow/telemetry/utils.py). Values a user set are kept.
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
