"""Configuration: defaults, presets (conf/<group>/<name>.yaml) and `key=value` overrides.

    cfg = load_config(["task=heart-disease", "privacy.target_epsilon=4"])

Presets are named by group (`preset=`, `task=`, `privacy=`: conf/<group>/<name>.yaml;
`preset=` names a whole scenario, e.g. `preset=cross-device`); any other
`group.key=value` sets a key. The result is a typed OmegaConf object: assigning an unknown key or a wrong type
fails, so a config that loads is a config that is valid.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedshield.privacy.errors import FedShieldError

from .schema import FedShieldConfig, validation_errors

CONF_DIR = Path(__file__).resolve().parent
PRESET_GROUPS = ("task", "privacy", "preset")  # the folders of conf/ (a test checks)


class ConfigError(FedShieldError):
    """A config key, value or preset is not valid."""


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, Mapping) or OmegaConf.is_dict(v):
            keys.extend(_all_keys(v, full + "."))
    return keys


_DEFAULTS = OmegaConf.structured(FedShieldConfig)
_KNOWN_KEYS = _all_keys(_DEFAULTS)
GROUPS = tuple(str(k) for k in _DEFAULTS)  # task, federation, ...: the schema's order
_SECTIONS = {k for k in _KNOWN_KEYS if OmegaConf.is_dict(OmegaConf.select(_DEFAULTS, k))}


def _unknown_key(key: str) -> str:
    candidates = [k for k in _KNOWN_KEYS if k not in _SECTIONS] if "." in key else list(GROUPS)
    close = difflib.get_close_matches(key, candidates, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    parts = key.split(".")
    # The deepest known section above the key: what may be set there.
    above = [s for s in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if s in _SECTIONS]
    if above:
        section = above[0]
        allowed = sorted(k for k in _KNOWN_KEYS if k.rsplit(".", 1)[0] == section and "." in k)
        return f"unknown key {key!r}{hint}; allowed here: {', '.join(allowed)}"
    presets_text = ", ".join(f"{g}={'|'.join(presets(g))}" for g in PRESET_GROUPS)
    what = f"no group {parts[0]!r}" if len(parts) > 1 else "a key is GROUP.KEY"
    return f"unknown key {key!r}{hint}: {what}; groups: {', '.join(GROUPS)}; presets: {presets_text}"


def _check_keys(flat: Mapping[str, Any], where: str) -> None:
    for key, value in flat.items():
        if key not in _KNOWN_KEYS:
            raise ConfigError(f"{where}: {_unknown_key(key)}")
        if key in _SECTIONS:
            raise ConfigError(f"{where}: {key}={value!r}: {key!r} is a group; set its keys ({key}.KEY=value)")


def _mapping(data: object, where: str) -> Mapping[str, Any]:
    """A YAML document's top: a mapping of keys (an empty document is an empty one)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: not a mapping of keys (got a {type(data).__name__})")
    return data


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in node.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _merge(cfg: DictConfig, flat: Mapping[str, Any], where: str) -> None:
    _check_keys(flat, where)
    for key, value in flat.items():
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as exc:
            msg = str(exc).splitlines()[0]
            raise ConfigError(f"{where}: {key}={value!r}: {msg}") from None


def _load_preset(group: str, name: str) -> dict[str, Any]:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{group}={name!r}: no such preset; allowed: {', '.join(presets(group))}"
        )
    return _flatten(_mapping(OmegaConf.to_container(OmegaConf.load(path)), f"{group}={name!r} ({path})"))


def _control_character(text: str) -> str | None:
    """The first control character in `text` (C0, DEL, C1), else None."""
    return next((c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0), None)


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` -> (key, value parsed as OmegaConf parses a dotlist value).

    A control character anywhere in the item is refused with one line that names the key:
    the YAML reader under `from_dotlist` would raise a multi-line ReaderError, and a value
    that reached the run (a name, a path) would carry it into logs and the report.
    """
    if "=" not in item:
        bad = _control_character(item)
        shown = item if bad is None else item.encode("unicode_escape").decode("ascii")
        raise ConfigError(f"override {shown!r}: expected key=value (e.g. federation.rounds=3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    bad = _control_character(item)
    if bad is not None:
        name = key.encode("unicode_escape").decode("ascii")
        raise ConfigError(f"override {name}=...: holds the control character U+{ord(bad):04X}; "
                          "control characters are not allowed in overrides")
    value = OmegaConf.from_dotlist([f"v={raw}"]).v if raw != "" else ""
    return key, value


def load_config(
    overrides: Iterable[str] = (), base: Mapping[str, Any] | None = None
) -> DictConfig:
    """Defaults, then `base` (a flat or nested mapping), then presets and overrides.

    Presets are applied before plain keys, whatever their order on the command line, so
    that `privacy.target_epsilon=4 privacy=dp-sgd` means what its writer meant; a
    `preset=` (conf/preset/: a whole scenario) before the group presets.
    """
    cfg: DictConfig = OmegaConf.structured(FedShieldConfig)
    if base:
        _merge(cfg, _flatten(dict(base)), "config")
    parsed = [parse_override(item) for item in overrides]
    # A whole-run preset (`preset=`, several groups at once) goes first, so that a group
    # preset or a key named with it refines it whatever the order on the command line.
    ordered = [kv for kv in parsed if kv[0] == "preset"] + [kv for kv in parsed if kv[0] != "preset"]
    for key, value in ordered:
        if key in PRESET_GROUPS:
            _merge(cfg, _load_preset(key, str(value)), f"preset {key}={value}")
    plain = {k: v for k, v in parsed if k not in PRESET_GROUPS}
    _merge(cfg, plain, "override")
    errors = validation_errors(cfg)  # type: ignore[arg-type]  # a structured DictConfig reads as the schema
    if errors:
        raise ConfigError(f"config: {errors[0]}")
    return cfg


def load_config_file(path: str | Path, overrides: Iterable[str] = ()) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r}: not found")
    try:
        data = OmegaConf.to_container(OmegaConf.load(p))
    except Exception as exc:  # yaml errors carry line numbers in their message
        raise ConfigError(f"config file {str(p)!r}: not valid YAML: {exc}") from None
    return load_config(overrides, base=_mapping(data, f"config file {str(p)!r}"))


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def from_yaml(text: str) -> DictConfig:
    return load_config(base=_mapping(OmegaConf.to_container(OmegaConf.create(text)), "config"))


def to_flat(cfg: DictConfig) -> dict[str, Any]:
    """Dotted keys, as Flower's run_config flattens nested TOML tables."""
    return _flatten(_mapping(OmegaConf.to_container(cfg), "config"))


def flat_from_yaml(text: str, where: str) -> dict[str, Any]:
    """A YAML mapping of fedshield's keys (nested or dotted) as dotted keys, not yet checked
    against the schema; "" is {}. `where` names the source in the one-line error."""
    if not text.strip():
        return {}
    try:
        created = OmegaConf.create(text)
    except Exception as exc:  # a YAML parser's message spans lines
        raise ConfigError(f"{where}: not YAML ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(created, DictConfig):
        raise ConfigError(f"{where}: a YAML mapping of fedshield's keys, not a list")
    return to_flat(created)
