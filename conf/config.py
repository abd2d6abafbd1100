"""`Config`: one validated, immutable fedshield configuration, the Python API's form of the
schema (conf/schema.py). `fedshield.Config` is this class.

    config = Config.load(["task=heart-disease", "federation.rounds=3"])
    config.privacy.target_epsilon          # 8.0, a float to mypy (PrivacyConfig.target_epsilon)
    fewer = config.with_overrides("federation.rounds=1")   # a new Config; `config` is unchanged

Every constructor goes through `conf.load_config` (defaults, presets, overrides, then the
range checks), so a Config that exists is valid, and a bad key or value is the CLI's own
one-line `ConfigError`. Nothing can change one afterwards: setting an attribute of the
Config or of a section raises `dataclasses.FrozenInstanceError`; the sections are frozen
copies of the schema's dataclasses (lists become tuples), and the OmegaConf object inside
is read-only. The rooms below the edge (task/, client/, server/, simulations/) take this
object, never a `DictConfig`: a section's field is typed for mypy, and nothing there can
change a config that another part holds. `to_omegaconf()` gives a fresh, mutable copy for
a caller's own OmegaConf code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn, cast

from omegaconf import DictConfig, OmegaConf

from fedshield import conf
from fedshield.conf.schema import (
    FederationConfig,
    FedShieldConfig,
    OutputConfig,
    PrivacyConfig,
    SimulationConfig,
    TaskConfig,
    TrainingConfig,
)

_SCHEMA_SECTIONS: dict[str, type] = {
    "task": TaskConfig, "federation": FederationConfig, "training": TrainingConfig,
    "privacy": PrivacyConfig, "simulation": SimulationConfig, "output": OutputConfig,
}
# A frozen twin of each section's dataclass: the same field names, types and repr, but
# assignment raises. (A frozen dataclass cannot subclass the schema's mutable one, and the
# schema itself stays mutable: OmegaConf merges overrides into it.)
_FROZEN_SECTIONS: dict[str, type] = {
    name: dataclasses.make_dataclass(cls.__name__, [(f.name, f.type) for f in dataclasses.fields(cls)], frozen=True)
    for name, cls in _SCHEMA_SECTIONS.items()
}
for _twin in _FROZEN_SECTIONS.values():
    _twin.__module__ = __name__
assert tuple(_SCHEMA_SECTIONS) == tuple(f.name for f in dataclasses.fields(FedShieldConfig))

_HOW_TO_BUILD = "build a Config with Config.load([...]), Config.from_yaml(path), Config.from_dict(...) " \
                "or Config.from_run(run_dir)"


def _overrides(items: Iterable[str] | str, where: str) -> list[str]:
    """The items as a list of strings; one string is one override."""
    listed = [items] if isinstance(items, str) else list(items)
    for item in listed:
        if not isinstance(item, str):
            raise conf.ConfigError(f"{where}: {item!r}: expected a 'key=value' string (e.g. 'federation.rounds=3')")
    return listed


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


class Config:
    """A validated, immutable fedshield configuration (see the module's docstring)."""

    __slots__ = ("_cfg", "_sections")
    _cfg: DictConfig
    _sections: dict[str, Any]

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(_HOW_TO_BUILD)

    @classmethod
    def _of(cls, cfg: DictConfig) -> Config:
        """Wrap a config that `conf.load_config` validated (the only way in)."""
        self = object.__new__(cls)
        OmegaConf.set_readonly(cfg, True)
        data = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(data, dict)
        sections = {name: twin(**{k: _frozen(v) for k, v in data[name].items()})
                    for name, twin in _FROZEN_SECTIONS.items()}
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_sections", sections)
        return self

    # ------------------------------------------------------------------ constructors

    @classmethod
    def load(cls, overrides: Iterable[str] | str = (), *, preset: str | None = None) -> Config:
        """The defaults, then `preset` (a whole scenario: conf/preset/<name>.yaml), then the
        `key=value` overrides and group presets (`task=heart-disease`, `privacy=none`), as
        on the command line."""
        items = _overrides(overrides, "Config.load")
        if preset is not None:
            items = [f"preset={preset}", *items]
        return cls._of(conf.load_config(items))

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Iterable[str] | str = ()) -> Config:
        """A YAML file (as `fedshield simulate --config FILE`), then `overrides`."""
        return cls._of(conf.load_config_file(path, _overrides(overrides, "Config.from_yaml")))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], overrides: Iterable[str] | str = ()) -> Config:
        """A nested (`{"federation": {"rounds": 3}}`) or dotted (`{"federation.rounds": 3}`)
        mapping of Python values, then `overrides`."""
        if not isinstance(data, Mapping):
            raise conf.ConfigError(f"Config.from_dict: expected a mapping of keys to values, not {type(data).__name__}")
        return cls._of(conf.load_config(_overrides(overrides, "Config.from_dict"), base=data))

    @classmethod
    def from_text(cls, yaml_text: str) -> Config:
        """A config written by `to_yaml` (a coordinator's plan as it reaches a site)."""
        return cls._of(conf.from_yaml(yaml_text))

    @classmethod
    def from_run(cls, run_dir: str | Path) -> Config:
        """The config of the run in `run_dir` (its config.yaml), with `output.dir` and
        `output.run_name` naming that folder: what `simulate(..., resume=True)` continues."""
        run = Path(run_dir).expanduser().resolve()
        saved = conf.load_config_file(run / "config.yaml")
        data = cast(dict[str, Any], OmegaConf.to_container(saved))
        data["output"].update({"dir": str(run.parent), "run_name": run.name})
        return cls._of(conf.load_config(base=data))

    # ------------------------------------------------------------------ changed copies

    def with_overrides(self, *overrides: str) -> Config:
        """A new Config: this one, then `key=value` overrides and presets, checked as the CLI
        checks them. A group preset (`task=heart-disease`) sets its keys over this config's."""
        return Config._of(conf.load_config(_overrides(overrides, "with_overrides"), base=self.to_dict()))

    def with_values(self, values: Mapping[str, Any]) -> Config:
        """A new Config with dotted keys set to Python values (no parsing: any path, any
        character a value may hold), checked as overrides are."""
        if not isinstance(values, Mapping):
            raise conf.ConfigError(f"with_values: expected a mapping of dotted keys to values, not "
                                   f"{type(values).__name__}")
        return Config._of(conf.load_config(base={**conf.to_flat(self._cfg), **values}))

    # ------------------------------------------------------------------ typed sections

    @property
    def task(self) -> TaskConfig:
        return cast(TaskConfig, self._sections["task"])

    @property
    def federation(self) -> FederationConfig:
        return cast(FederationConfig, self._sections["federation"])

    @property
    def training(self) -> TrainingConfig:
        return cast(TrainingConfig, self._sections["training"])

    @property
    def privacy(self) -> PrivacyConfig:
        return cast(PrivacyConfig, self._sections["privacy"])

    @property
    def simulation(self) -> SimulationConfig:
        return cast(SimulationConfig, self._sections["simulation"])

    @property
    def output(self) -> OutputConfig:
        return cast(OutputConfig, self._sections["output"])

    # ------------------------------------------------------------------ out

    def to_yaml(self) -> str:
        """The whole config as YAML: `Config.from_yaml` (or `fedshield simulate --config`) reads it back."""
        return conf.to_yaml(self._cfg)

    def to_dict(self) -> dict[str, Any]:
        """The whole config as nested plain dicts and lists (a new copy each time)."""
        data = OmegaConf.to_container(self._cfg, resolve=True)
        assert isinstance(data, dict)
        return cast(dict[str, Any], data)

    def to_flat(self) -> dict[str, Any]:
        """The whole config as dotted keys and their values (`{"federation.rounds": 40, ...}`)."""
        return conf.to_flat(self._cfg)

    def to_omegaconf(self) -> DictConfig:
        """A mutable copy as a typed OmegaConf object (for a caller's own OmegaConf code)."""
        return conf.load_config(base=self.to_dict())

    def changed(self) -> dict[str, Any]:
        """The dotted keys whose values differ from the schema's defaults."""
        defaults = conf.to_flat(OmegaConf.structured(FedShieldConfig))
        return {k: v for k, v in conf.to_flat(self._cfg).items() if defaults.get(k) != v}

    # ------------------------------------------------------------------ value semantics

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise dataclasses.FrozenInstanceError(
            f"a fedshield Config is immutable: cannot set {name!r}; make a changed copy with "
            "config.with_overrides('KEY=VALUE')")

    def __delattr__(self, name: str) -> NoReturn:
        raise dataclasses.FrozenInstanceError(f"a fedshield Config is immutable: cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_yaml())

    def __repr__(self) -> str:
        changed = ", ".join(f"{k}={v!r}" for k, v in self.changed().items())
        return f"Config({changed})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Config.from_dict, (self.to_dict(),))
