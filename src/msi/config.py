"""Every setting of a run, as typed dataclasses loaded from YAML with dotted ``key=value`` overrides.

This module imports no other msi module except the bottom layer: the error type and the model registry (which
itself imports only the error type at module level; ``validate`` asks it about ``model.name``). Rules:
- an unknown key (in YAML or an override) is an error that names it and suggests the closest valid key;
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

from msi import registry
from msi.errors import ConfigError, read_utf8, warn

METRICS = ("recall", "ndcg", "precision", "map", "hit", "mrr")
MAX_SEED = 2**63 - 1  # torch.manual_seed's range
MAX_INT = 2**63 - 1  # torch's int64: an integer setting above it (train.batch_size=1e30) never reaches a tensor
MAX_LR = 1.0  # Adam moves every weight by about lr per step: above 1 the weights overflow within a few steps
CODE_PLACEMENTS = ("sample", "mean")  # model.code_placement
MI_ESTIMATORS = ("infonce", "jsd")  # model.mi_estimator
SCORE_VIEWS = ("id", "all")  # model.score_views


@dataclass
class DataConfig:
    root: str = "data"  # folder holding one sub-folder per data set (relative: to the YAML file)
    name: str = "quickstart"  # data set folder <root>/<name>/ with <name>.inter
    # ordered modality name -> feature file inside the data set folder; MSI's SSD needs exactly two
    modalities: dict[str, str] = field(
        default_factory=lambda: {"image": "image_feat.npy", "text": "text_feat.npy"}
    )
    synth_preset: str = ""  # if set and the data set is missing, generate it with this preset first
    synth_seed: int = 0  # seed of that generation


@dataclass
class ModelConfig:
    name: str = "msi"  # a registered model: msi | lightgcn | a plugin's (docs/adding_a_model.md)
    embedding_dim: int = 64  # d
    n_layers: int = 1  # L, LightGCN layers of every graph
    dropout: float = 0.3  # p of the target-view dropout (contrastive view generator)
    tau: float = 0.2  # InfoNCE temperature of the SSD module
    use_ssd: bool = True  # superfluous semantics discarding (Gaussian encoders, InfoNCE + AKL)
    use_ip: bool = True  # interaction preserving (modality LightGCN graphs)
    freeze_features: bool = False  # keep raw item features fixed (BM3 trains them)
    code_placement: str = "sample"  # sample: SSD samples feed graphs and losses | mean: means downstream, samples in L_ssd
    mi_estimator: str = "infonce"  # infonce: cosine InfoNCE (SPEC) | jsd: MLP critic with the Jensen-Shannon bound (MIB)
    score_views: str = "id"  # id: score items with P z_s^i (SPEC) | all: P z_s^i + sum_m P z_s^m


@dataclass
class LossConfig:
    alpha: float = 0.1  # weight of L_ssd
    beta: float = 1e-4  # weight of the average KL inside L_ssd
    beta_warmup: int = 0  # epochs over which beta rises linearly from 0 to its value (0: off)
    gamma: float = 0.1  # weight of L_reg (BM3's reg_weight)
    w_align: float = 1.0  # weight of L_align (BM3: cl_weight 2.0)
    w_mask: float = 1.0  # weight of L_mask (BM3: cl_weight 2.0)


@dataclass
class TrainConfig:
    epochs: int = 1000  # at most this many epochs
    batch_size: int = 2048  # positive (user, item) pairs per step
    lr: float = 1e-3  # Adam learning rate, no weight decay
    seed: int = 2026  # seeds every RNG (python, numpy, torch)
    eval_every: int = 1  # evaluate on valid every this many epochs
    patience: int = 20  # stop after this many evaluations without a better valid metric
    checkpoint_every: int = 1  # write last.pt every this many epochs (and at the end); --resume starts there
    metric: str = "recall@20"  # valid metric for early stopping and the best checkpoint
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    autocast: str = "off"  # off | bf16: bfloat16 autocast of the dense layers (a GPU speed option; changes numbers)
    out_dir: str = "runs"  # runs are written to <out_dir>/<run name>/ (relative: to the YAML file)
    run_name: str = ""  # empty: <data name>-<model name>-<timestamp>
    tensorboard: bool = False  # also write TensorBoard event files to <run dir>/tensorboard/ (extra: tensorboard)


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 20])  # cut-offs for every metric
    batch_users: int = 4096  # users scored per batch on the device
    mask_valid_at_test: bool = False  # MMRec keeps valid items as test candidates; true masks them


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "train": TrainConfig, "eval": EvalConfig}
_PATH_KEYS = (("data", "root"), ("train", "out_dir"))


def _section_types(section: str) -> dict[str, Any]:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def valid_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _section_types(s)]


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


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
    raise ConfigError(f"config key '{key}': cannot read {value!r} as {name}")


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    types = _section_types(section) if section in SECTIONS else {}
    if key not in types:
        raise _unknown(f"{section}.{key}")
    setattr(getattr(cfg, section), key, _convert(f"{section}.{key}", value, types[key]))


def _apply_mapping(cfg: Config, raw: dict[str, Any], where: str) -> None:
    for section, values in raw.items():
        if section not in SECTIONS:
            raise _unknown(str(section))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping of keys to values")
        for key, value in values.items():
            _apply(cfg, section, str(key), value)


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

    An override's text is converted by the key's declared type: raw text for a string key (``data.name=007``
    stays ``007``), YAML for the others (``eval.ks=[10,20]``, ``loss.beta=1e-4``).
    """
    cfg = Config()
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        _apply_mapping(cfg, _read_yaml(path), str(path))
        base = path.resolve().parent
    from_cli: dict[tuple[str, str], str] = {}
    for section, key, value in parse_overrides(overrides or []):
        if section not in SECTIONS:
            raise _unknown(f"{section}.{key}")
        if (section, key) in from_cli:
            warn(f"override {section}.{key} is given twice ({from_cli[section, key]!r}, then {value!r}); "
                  "the last is used")
        declared = _section_types(section).get(key)
        _apply(cfg, section, key, value if declared is str or not value else _yaml_value(section, key, value))
        from_cli[section, key] = value
    for section, key in _PATH_KEYS:  # a path from the command line is relative to the working directory
        p = Path(getattr(getattr(cfg, section), key)).expanduser()
        root = Path.cwd() if (section, key) in from_cli else base
        setattr(getattr(cfg, section), key, str(p if p.is_absolute() else (root / p).resolve()))
    validate(cfg)
    return cfg


def _yaml_value(section: str, key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"config key '{section}.{key}': cannot read {text!r}") from None


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config saved with ``to_dict`` (paths are already absolute)."""
    cfg = Config()
    _apply_mapping(cfg, raw, "saved config")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject impossible values with a message that names the key."""
    m, lo, t, e, d = cfg.model, cfg.loss, cfg.train, cfg.eval, cfg.data
    model = registry.get(m.name)  # an unknown name: a ConfigError about model.name with a did-you-mean
    checks = [
        (m.embedding_dim > 0, "model.embedding_dim", "must be > 0"),
        (m.n_layers >= 0, "model.n_layers", "must be >= 0"),
        (0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)"),
        (m.tau > 0, "model.tau", "must be > 0"),
        (m.code_placement in CODE_PLACEMENTS, "model.code_placement", f"must be one of {', '.join(CODE_PLACEMENTS)}"),
        (m.mi_estimator in MI_ESTIMATORS, "model.mi_estimator", f"must be one of {', '.join(MI_ESTIMATORS)}"),
        (m.score_views in SCORE_VIEWS, "model.score_views", f"must be one of {', '.join(SCORE_VIEWS)}"),
        (all(v >= 0 for v in asdict(lo).values()), "loss", "weights must be >= 0"),
        (t.epochs > 0, "train.epochs", "must be > 0"),
        (t.batch_size > 0, "train.batch_size", "must be > 0"),
        (0 < t.lr <= MAX_LR, "train.lr", f"must be in (0, {MAX_LR}]"),
        (0 <= t.seed <= MAX_SEED, "train.seed", "must be in [0, 2**63 - 1]"),
        (t.eval_every > 0, "train.eval_every", "must be > 0"),
        (t.eval_every <= t.epochs, "train.eval_every", f"must be <= train.epochs ({t.epochs}), or valid is never "
         "scored and no best checkpoint is kept"),
        (t.patience > 0, "train.patience", "must be > 0"),
        (t.checkpoint_every > 0, "train.checkpoint_every", "must be > 0"),
        (t.autocast in ("off", "bf16"), "train.autocast", "must be off or bf16"),
        (len(e.ks) > 0 and all(k > 0 for k in e.ks), "eval.ks", "must be a non-empty list of K > 0"),
        (e.batch_users > 0, "eval.batch_users", "must be > 0"),
        (bool(d.name), "data.name", "must not be empty"),
        (not model.item_features or len(d.modalities) > 0, "data.modalities", "must name at least one modality"),
    ]
    for section in ("model", "loss", "train"):  # inf or nan in any float key (train.lr=.inf, model.tau=nan)
        for key, value in asdict(getattr(cfg, section)).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key '{section}.{key}' must be a finite number (got {value!r})")
    for section in SECTIONS:  # every integer, eval.ks' included
        for key, value in asdict(getattr(cfg, section)).items():
            if any(type(v) is int and abs(v) > MAX_INT for v in (value if isinstance(value, list) else [value])):
                raise ConfigError(f"config key '{section}.{key}' must lie within ±(2**63 - 1) (got {value!r})")
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' {msg} (got {_get(cfg, key)!r})")
    metric, _, k = t.metric.partition("@")
    if metric not in METRICS or not k.isdigit() or int(k) <= 0:
        raise ConfigError(f"config key 'train.metric' must look like recall@20 ({'|'.join(METRICS)}), got {t.metric!r}")
    if int(k) not in e.ks:
        raise ConfigError(f"config key 'train.metric' is {t.metric!r} but eval.ks is {e.ks}: add {k} to eval.ks")
    if m.name == "msi" and m.use_ssd and len(d.modalities) != 2:
        raise ConfigError(
            f"model.use_ssd needs exactly two modalities (got {len(d.modalities)}: {list(d.modalities)}); "
            "set model.use_ssd=false or list two in data.modalities"
        )


def _get(cfg: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    obj = getattr(cfg, section)
    return getattr(obj, name) if name else asdict(obj)


__all__ = [
    "Config",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "parse_overrides",
    "valid_keys",
    "validate",
]
