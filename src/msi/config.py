"""Every setting of a run, as typed dataclasses loaded from YAML with dotted ``key=value`` overrides.

The ``data``, ``train`` and ``eval`` sections are declared here; the ``model`` and ``loss`` sections are the ones
the chosen model declares in the registry (``msi.registry.register(name, model=..., loss=...)``), so this module
names no model: ``model.name`` is read first and decides which keys exist. It imports the bottom layer (the error
type and the registry) and ``msi.models``, whose import registers the built-in models (plugins register on their
first lookup); no model module imports this one. Rules:
- an unknown key (in YAML or an override) is an error that names it and suggests the closest valid key (for a
  model key, also the models that do declare it);
- values are converted by the field's declared type (PyYAML reads ``1e-4`` as a string);
- impossible values (negative dropout, K <= 0, an empty modality list) are errors;
- relative paths in a YAML file are resolved against the directory of that file; relative paths given as
  command-line overrides against the working directory.
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

import msi.models  # noqa: F401  (registers the built-in models)
from msi import registry
from msi.errors import ConfigError, raised, read_utf8, shown, warn
from msi.files import check_name
from msi.registry import key

METRICS = ("recall", "ndcg", "precision", "map", "hit", "mrr")
MAX_SEED = 2**63 - 1  # torch.manual_seed's range
MAX_INT = 2**63 - 1  # torch's int64: an integer setting above it (train.batch_size=1e30) never reaches a tensor
MAX_LR = 1.0  # Adam moves every weight by about lr per step: above 1 the weights overflow within a few steps
MAX_FILE = 1 << 20  # bytes of a config file: msi's are about 1 KB; a bigger one is not a config
MAX_TEXT = 4096  # characters of a string value (a path, a name)
MAX_ITEMS = 1000  # entries of a list or mapping value (eval.ks, data.modalities)
# what a resume may change: how long and how often, never the model or the data
RESUME_KEYS = ("train.epochs", "train.patience", "train.eval_every", "train.checkpoint_every", "train.tensorboard")
# keys that say where or how a run ran, not what it trained: runs differing only in them are seeds of one setting
NOT_A_SETTING = frozenset({"train.seed", "train.run_name", "train.out_dir", "data.root", "train.device",
                           "train.checkpoint_every", "train.tensorboard"})


@dataclass
class DataConfig:
    root: str = key("data", "folder holding one sub-folder per data set (relative: to the YAML file)")
    name: str = key("quickstart", "data set folder <root>/<name>/ holding <name>.inter")
    modalities: dict[str, str] = key({"image": "image_feat.npy", "text": "text_feat.npy"},
                                     "ordered modality name -> feature file (.npy) inside the data set folder")
    synth_preset: str = key("", "if set and the data set is missing, generate it with this msi-data synth preset")
    synth_seed: int = key(0, "seed of that generation", check=">=0")


@dataclass
class TrainConfig:
    epochs: int = key(1000, "at most this many epochs", check=">0")
    batch_size: int = key(2048, "positive (user, item) pairs per step", check=">0")
    lr: float = key(1e-3, "Adam learning rate, no weight decay")
    seed: int = key(2026, "seeds every RNG (python, numpy, torch)")
    eval_every: int = key(1, "evaluate on valid every this many epochs", check=">0")
    patience: int = key(20, "stop after this many evaluations without a better valid metric", check=">0")
    checkpoint_every: int = key(1, "write last.pt every this many epochs (and at the end); --resume starts there",
                                check=">0")
    metric: str = key("recall@20", "valid metric for early stopping and the best checkpoint")
    device: str = key("auto", "auto | cpu | cuda | cuda:N")
    autocast: str = key("off", "off | bf16: bfloat16 autocast of the dense layers (a GPU speed option; changes "
                        "numbers)", choices=("off", "bf16"))
    out_dir: str = key("runs", "runs are written to <out_dir>/<run name>/ (relative: to the YAML file)")
    run_name: str = key("", "empty: <data name>-<model name>-<timestamp>")
    tensorboard: bool = key(False, "also write TensorBoard event files to <run dir>/tensorboard/ (extra: tensorboard)")


@dataclass
class EvalConfig:
    ks: list[int] = key([10, 20], "cut-offs for every metric")
    batch_users: int = key(4096, "users scored per batch on the device", check=">0")
    mask_valid_at_test: bool = key(False, "MMRec keeps valid items as test candidates; true masks them")


def _model_section(name: str = registry.DEFAULT) -> Any:
    return registry.get(name).model()


def _loss_section(name: str = registry.DEFAULT) -> Any:
    return registry.get(name).loss()


@dataclass
class Config:
    """A run's settings. ``model`` and ``loss`` are the sections the chosen model declares (msi.registry): their
    classes change with ``model.name``; ``Config.for_model(name)`` gives the defaults of one model."""

    data: DataConfig = field(default_factory=DataConfig)
    model: Any = field(default_factory=_model_section)
    loss: Any = field(default_factory=_loss_section)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def for_model(cls, name: str) -> "Config":
        """The defaults, with ``name``'s model and loss sections (an unknown name: a ConfigError, did-you-mean)."""
        return cls(model=_model_section(name), loss=_loss_section(name))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS = ("data", "model", "loss", "train", "eval")
_PATH_KEYS = (("data", "root"), ("train", "out_dir"))


def yaml_text(value: Any) -> str:
    """``value`` as YAML writes it in flow style: true, 0.001, data, [10, 20], {image: image_feat.npy}."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def settings(cfg: Config) -> dict[str, str]:
    """What a run trained: each key but ``NOT_A_SETTING``, flat (``model.dropout``), its value as ``yaml_text``."""
    return {f"{s}.{k}": yaml_text(v) for s, sec in cfg.to_dict().items() for k, v in sec.items()
            if f"{s}.{k}" not in NOT_A_SETTING}


def section_fields(cfg: Config, section: str) -> dict[str, Any]:
    """A section's key -> its dataclass Field (type, default, and the help/check metadata of ``registry.key``)."""
    return {f.name: f for f in fields(getattr(cfg, section))}


def _section_types(cfg: Config, section: str) -> dict[str, Any]:
    """A section's key -> its declared type (annotations resolved)."""
    return registry.key_types(type(getattr(cfg, section)))


def valid_keys(model: str = registry.DEFAULT) -> list[str]:
    """Every key of a config whose model.name is ``model``, as ``section.key``."""
    cfg = Config.for_model(model)
    return [f"{s}.{k}" for s in SECTIONS for k in _section_types(cfg, s)]


def _unknown_section(section: str) -> ConfigError:
    """A top-level YAML key that is no section: a misspelt one, or 'train.epochs: 1' written flat."""
    outer, _, inner = section.partition(".")
    if outer in SECTIONS and inner:
        return ConfigError(f"unknown config section '{section}': keys nest under their section; write "
                           f"'{outer}:' and under it '  {inner}: ...'")
    close = difflib.get_close_matches(section, SECTIONS, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config section '{section}'{hint} (sections: {', '.join(SECTIONS)})")


def _unknown(key: str, model: str = registry.DEFAULT) -> ConfigError:
    section, _, name = key.partition(".")
    if not name:
        return _unknown_section(section)
    keys = valid_keys(model)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    if section not in ("model", "loss"):
        return ConfigError(f"unknown config key '{key}'{hint}")
    owners = [n for n in registry.names() if n != model and _declares(n, section, name)]
    if owners:
        hint += f"; it is a key of {', '.join(owners[:5])}{', ...' if len(owners) > 5 else ''}"
    return ConfigError(f"unknown config key '{key}' for model.name={model}{hint} "
                       f"(msi-train --list-keys model.name={model} lists its keys)")


def _declares(model: str, section: str, name: str) -> bool:
    try:
        entry = registry.get(model)
    except Exception:  # a broken plugin is not the subject of this message
        return False
    return name in {f.name for f in fields(getattr(entry, section))}


def _convert(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to the declared type ``tp`` (bool, int, float, str, list[int], dict[str, str])."""
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str) and "e" in value.lower():  # '1e3' from YAML; '1.5e0' is not an int
                value = float(value)
                if not value.is_integer():
                    raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, bool):  # YAML's yes/no/on/off/true: quote it for the text
                raise ConfigError(f"config key '{key}': YAML reads {shown(value)} as a boolean, not text; quote "
                                  f"it: '{str(value).lower()}'")
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
        if origin is list:
            if isinstance(value, str):
                value = [v for v in value.strip("[]").split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            (inner,) = typing.get_args(tp)
            return [_convert(key, v, inner) for v in value]
        if origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError
            return {str(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        pass
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"config key '{key}': cannot read {shown(value)} as {name}")


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    types = _section_types(cfg, section) if section in SECTIONS else {}
    if key not in types:
        raise _unknown(f"{section}.{key}", cfg.model.name)
    converted = _convert(f"{section}.{key}", value, types[key])
    if (section, key) == ("model", "name"):  # chosen before the sections were made (_model_name); kept as is
        return
    setattr(getattr(cfg, section), key, converted)


def _apply_mapping(cfg: Config, raw: dict[str, Any], where: str, lenient: bool = False) -> None:
    """Apply a YAML mapping of sections. ``lenient``: a model/loss key the model does not declare is dropped (a
    saved config of an older msi, which wrote every model's keys into every run)."""
    for section, values in raw.items():
        if section not in SECTIONS:
            raise _unknown_section(str(section))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping of keys to values")
        types = _section_types(cfg, section)
        for key, value in values.items():
            if lenient and section in ("model", "loss") and str(key) not in types:
                continue
            _apply(cfg, section, str(key), value)


def _model_name(raw: dict[str, Any], overrides: list[tuple[str, str, str]], where: str) -> str:
    """model.name as the YAML mapping and the overrides give it (the last override wins), else the default."""
    name: Any = registry.DEFAULT
    model = raw.get("model")
    if isinstance(model, dict) and "name" in model:
        name = model["name"]
    for section, key, value in overrides:
        if (section, key) == ("model", "name"):
            name = value
    if not isinstance(name, str) or not name:
        raise ConfigError(f"config key 'model.name' must be a registered model's name (got {shown(name)}; {where})")
    return name


def parse_overrides(overrides: list[str]) -> list[tuple[str, str, str]]:
    """``["model.alpha=0.01"]`` -> ``[("model", "alpha", "0.01")]``; a malformed item is an error."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. train.epochs=5)")
        out.append((section, name, value.strip()))
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader that records keys given twice in one mapping (PyYAML keeps the last silently)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[Any, int]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                self.duplicates.append((key, key_node.start_mark.line + 1))
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size > MAX_FILE:
        raise ConfigError(f"{path}: {size:,} bytes is not a config file (msi reads at most {MAX_FILE:,})")
    loader = _Loader(read_utf8(path, ConfigError))
    try:
        raw = loader.get_single_data() or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    finally:
        loader.dispose()
    for key, line in loader.duplicates:
        warn(f"{path}:{line}: key '{key}' is given twice; the last value is used")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, ...)")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the defaults when ``path`` is None), apply overrides, resolve paths, validate.

    ``model.name`` (the YAML's, or the last override's) is read first: it decides which ``model.*`` and ``loss.*``
    keys exist. An override's text is converted by the key's declared type: raw text for a string key
    (``data.name=007`` stays ``007``), YAML for the others (``eval.ks=[10,20]``, ``loss.beta=1e-4``).
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        raw = _read_yaml(path)
        base = path.resolve().parent
    parsed = parse_overrides(overrides or [])
    cfg = Config.for_model(_model_name(raw, parsed, str(path) if path is not None else "overrides"))
    _apply_mapping(cfg, raw, str(path))
    from_cli = _apply_overrides(cfg, parsed)
    for section, key in _PATH_KEYS:  # a path from the command line is relative to the working directory
        p = Path(getattr(getattr(cfg, section), key)).expanduser()
        root = Path.cwd() if (section, key) in from_cli else base
        setattr(getattr(cfg, section), key, str(p if p.is_absolute() else (root / p).resolve()))
    validate(cfg)
    return cfg


def _apply_overrides(cfg: Config, parsed: list[tuple[str, str, str]]) -> set[tuple[str, str]]:
    """Apply parsed ``key=value`` overrides to ``cfg`` (a key given twice: a warning, the last wins); returns the
    keys given."""
    from_cli: dict[tuple[str, str], str] = {}
    for section, key, value in parsed:
        if section not in SECTIONS:
            raise _unknown(f"{section}.{key}", cfg.model.name)
        if (section, key) in from_cli:
            warn(f"override {section}.{key} is given twice ({shown(from_cli[section, key])}, then {shown(value)}); "
                 "the last is used")
        declared = _section_types(cfg, section).get(key)
        _apply(cfg, section, key, value if declared is str or not value else _yaml_value(section, key, value))
        from_cli[section, key] = value
    return set(from_cli)


def resume_config(saved: Config, overrides: list[str]) -> tuple[Config, list[str]]:
    """``saved`` (a run's config) with the overrides a resume allows (``RESUME_KEYS``), applied as ``load_config``
    applies them and validated; and the changes, as ``train.epochs=8 (was 4)``. Any other key is a ConfigError."""
    parsed = parse_overrides(overrides)
    for section, key, _ in parsed:
        if f"{section}.{key}" not in RESUME_KEYS:
            raise ConfigError(f"--resume cannot change '{section}.{key}' (only {', '.join(RESUME_KEYS)}: how long "
                              "and how often, never the model or the data); start a new run for it")
    new = config_from_dict(saved.to_dict())
    _apply_overrides(new, parsed)
    validate(new)
    changes = [f"{name}={_get(new, name)} (was {_get(saved, name)})" for name in changed_keys(saved, new)]
    return new, changes


def changed_keys(a: Config, b: Config) -> list[str]:
    """The ``section.key`` names whose values differ between two configs."""
    da, db = a.to_dict(), b.to_dict()
    keys = [(s, k) for s in da for k in [*da[s], *(k for k in db[s] if k not in da[s])]]
    return [f"{s}.{k}" for s, k in keys if da[s].get(k) != db[s].get(k)]


def _yaml_value(section: str, key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"config key '{section}.{key}': cannot read {shown(text)}") from None


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config saved with ``to_dict`` (paths are already absolute). A model/loss key its model does not
    declare is dropped: msi before per-model keys saved MSI's keys in every run's config, whatever the model."""
    cfg = Config.for_model(_model_name(raw, [], "saved config"))
    _apply_mapping(cfg, raw, "saved config", lenient=True)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject impossible values with a message that names the key: each key's declared ``check`` / ``choices``
    (msi.registry.key), the rules across keys below, then the model's and loss's own ``validate(cfg)``."""
    t, e, d = cfg.train, cfg.eval, cfg.data
    entry = registry.get(cfg.model.name)  # an unknown name: a ConfigError about model.name with a did-you-mean
    for section in SECTIONS:
        for name, f in section_fields(cfg, section).items():
            _check_value(f"{section}.{name}", getattr(getattr(cfg, section), name), f.metadata)
    checks = [
        (0 < t.lr <= MAX_LR, "train.lr", f"must be in (0, {MAX_LR}]"),
        (0 <= t.seed <= MAX_SEED, "train.seed", "must be in [0, 2**63 - 1]"),
        (t.eval_every <= t.epochs, "train.eval_every", f"must be <= train.epochs ({t.epochs}), or valid is never "
         "scored and no best checkpoint is kept"),
        (len(e.ks) > 0 and all(k > 0 for k in e.ks), "eval.ks", "must be a non-empty list of K > 0"),
        (bool(d.name), "data.name", "must not be empty"),
        (not entry.item_features or len(d.modalities) > 0, "data.modalities", "must name at least one modality"),
    ]
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {msg} (got {shown(_get(cfg, key))})")
    metric, _, k = t.metric.partition("@")
    if metric not in METRICS or not (k.isascii() and k.isdigit() and len(k) < 20) or int(k) <= 0:
        raise ConfigError(f"config key 'train.metric' must look like recall@20 ({'|'.join(METRICS)}), got "
                          f"{shown(t.metric)}")
    if int(k) not in e.ks:
        raise ConfigError(f"config key 'train.metric' is {shown(t.metric)} but eval.ks is {e.ks}: add {k} to eval.ks")
    if t.run_name:
        check_name(t.run_name, "config key 'train.run_name':", ConfigError)
    for section in (cfg.model, cfg.loss):
        if hasattr(section, "validate"):
            try:
                section.validate(cfg)
            except ConfigError:
                raise
            except Exception as e:  # a plugin's own rule that fails otherwise: one line naming it
                raise ConfigError(f"model {shown(cfg.model.name)}: {type(section).__qualname__}.validate raised "
                                  f"{raised(e)}") from None


def _check_value(key: str, value: Any, meta: Any) -> None:
    """One key's value against the whole-class rules (finite floats, integers within int64, texts and collections of
    a bounded size) and its declaration."""
    if isinstance(value, float) and not math.isfinite(value):  # inf or nan in any float key (train.lr=.inf)
        raise ConfigError(f"config key '{key}' must be a finite number (got {shown(value)})")
    if isinstance(value, (list, dict)) and len(value) > MAX_ITEMS:
        raise ConfigError(f"config key '{key}' holds {len(value):,} entries; at most {MAX_ITEMS:,}")
    items = list(value.items()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
    for v in (x for item in items for x in (item if isinstance(item, tuple) else (item,))):
        if type(v) is int and abs(v) > MAX_INT:
            raise ConfigError(f"config key '{key}' must lie within ±(2**63 - 1) (got {shown(value)})")
        if isinstance(v, str) and len(v) > MAX_TEXT:
            raise ConfigError(f"config key '{key}' holds a text of {len(v):,} characters; at most {MAX_TEXT:,}")
    check, choices = meta.get("check"), meta.get("choices")
    if check is not None and not registry.CHECKS[check][0](value):
        raise ConfigError(f"config key '{key}' {registry.CHECKS[check][1]} (got {shown(value)})")
    if choices and value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))} (got {shown(value)})")


def describe_keys(overrides: list[str] | None = None) -> str:
    """Every key of the config that ``overrides`` (only ``model.name=NAME`` is read) would make: ``key: default``
    in YAML's spelling, and what it does, one line each (``msi-train --list-keys``)."""
    parsed = parse_overrides(overrides or [])
    if any((s, k) != ("model", "name") for s, k, _ in parsed):
        raise ConfigError("--list-keys takes only model.name=NAME (the model whose keys to list)")
    cfg = Config.for_model(_model_name({}, parsed, "overrides"))
    rows = []
    for section in SECTIONS:
        for name, f in section_fields(cfg, section).items():
            value = yaml_text(getattr(getattr(cfg, section), name))
            rows.append((f"{section}.{name}: {value}", f.metadata.get("help", "")))
    width = max(len(r[0]) for r in rows)
    head = (f"# the keys of model.name={cfg.model.name}; models: {', '.join(registry.names())} "
            "(--list-keys model.name=NAME lists another's)")
    return "\n".join([head, *(f"{k.ljust(width)}  # {h}" for k, h in rows)])


def _get(cfg: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    obj = getattr(cfg, section)
    return getattr(obj, name) if name else asdict(obj)


__all__ = [
    "NOT_A_SETTING",
    "RESUME_KEYS",
    "Config",
    "DataConfig",
    "EvalConfig",
    "TrainConfig",
    "section_fields",
    "changed_keys",
    "config_from_dict",
    "describe_keys",
    "load_config",
    "parse_overrides",
    "resume_config",
    "valid_keys",
    "validate",
]
