"""fedshield's keys as Flower's run config: `flwr run . --run-config "privacy.target_epsilon=4"`.

Flower accepts only the `--run-config` keys that the app declares in pyproject's
`[tool.flwr.app.config]`, and its values are bool, int, float or str only (TOML scalars,
no null, no list). So every leaf key of the schema is declared there, flat and dotted,
with the schema's default (a code gate, tests/test_code_gates.py, keeps the table equal to
`declared_defaults()`), encoded thus:

- a str key: the string itself;
- a key whose default is not a str (a number that may be null, a list): the text the
  fedshield command takes after `KEY=`, as a string: `"null"`, `"[neg,pos]"`, `"2.5"`;
  a plain number or bool works as well (`federation.update_norm_bound=2.5`).

Flower passes every declared key on every run, changed or not (flwr/common/config.py
fuse_dicts): `from_run_config` therefore lets only the values that differ from the
declared defaults override, so that the older one-YAML-string form
(`fedshield-config-yaml`, still accepted) is not undone by the defaults. Regenerate the
table with `python -m fedshield.conf.flower` after a schema change.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from fedshield import conf
from fedshield.conf.schema import FedShieldConfig

FlowerValue = bool | int | float | str


def _schema_defaults() -> dict[str, Any]:
    return conf.to_flat(OmegaConf.structured(FedShieldConfig))


def encode(value: Any) -> FlowerValue:
    if isinstance(value, bool | int | float | str):
        return value
    if value is None:
        return "null"
    if isinstance(value, list | tuple):  # as on the command line: task.labels=[neg,pos]
        return "[" + ",".join(str(v) for v in value) + "]"
    raise TypeError(f"no Flower run-config form for {value!r}")


def declared_defaults() -> dict[str, FlowerValue]:
    """Every leaf key of the schema with its default, as Flower's run config holds it."""
    return {key: encode(value) for key, value in _schema_defaults().items()}


def toml_value(value: FlowerValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def config_table() -> str:
    """The `[tool.flwr.app.config]` entries for pyproject.toml, one `"key" = value` a line."""
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in declared_defaults().items())


def from_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted keys of Flower's run config whose values differ from the declared
    defaults, decoded to the schema's values (a key that is not declared is kept as given:
    the config loader names it as unknown)."""
    schema = _schema_defaults()
    declared = declared_defaults()
    changed: dict[str, Any] = {}
    for key, value in run_config.items():
        if key in declared and value == declared[key] and type(value) is type(declared[key]):
            continue
        if isinstance(value, str) and key in schema and not isinstance(schema[key], str):
            _, value = conf.parse_override(f"{key}={value}")  # "null", "[neg,pos]", "2.5"
        changed[key] = value
    return changed


if __name__ == "__main__":
    print(config_table(), end="")
