"""msi.config: unknown keys, conversion by declared type, overrides, validation, paths, every shipped YAML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from msi.config import (Config, changed_keys, config_from_dict, load_config, parse_overrides, resume_config,
                        valid_keys)
from msi.rundir import write_config
from msi.data.dataset import Dataset
from msi import registry
from msi.errors import ConfigError
from msi.models import build_model

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def _yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_paper_settings():
    cfg = load_config()
    assert (cfg.model.name, cfg.model.embedding_dim, cfg.model.n_layers) == ("msi", 64, 1)
    assert (cfg.model.dropout, cfg.model.tau, cfg.model.use_ssd, cfg.model.use_ip) == (0.3, 0.2, True, True)
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma, cfg.loss.w_align, cfg.loss.w_mask) == (
        0.1, 1e-4, 0.1, 1.0, 1.0)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.patience, cfg.train.epochs) == (1e-3, 2048, 20, 1000)
    assert cfg.eval.ks == [10, 20]
    assert list(cfg.data.modalities) == ["image", "text"]


def test_unknown_key_in_yaml_names_it_and_suggests_the_closest(tmp_path):
    path = _yaml(tmp_path, "model:\n  dropuot: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.dropuot' for model\.name=msi; did you mean 'model\.dropout'"):
        load_config(path)


def test_unknown_section_in_yaml(tmp_path):
    path = _yaml(tmp_path, "modle:\n  dropout: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown config section 'modle'; did you mean 'model'\?"):
        load_config(path)


@pytest.mark.parametrize(
    "override, unknown, closest",
    [("loss.gama=0.01", "loss.gama", "loss.gamma"), ("trian.lr=0.1", "trian.lr", "train.lr"),
     ("model.n_layer=2", "model.n_layer", "model.n_layers")],
)
def test_unknown_key_in_override_names_it_and_suggests_the_closest(override, unknown, closest):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert f"'{unknown}'" in str(err.value) and f"did you mean '{closest}'" in str(err.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["epochs=5"])
    assert parse_overrides(["model.alpha=0.01", "eval.ks = [5, 10]"]) == [
        ("model", "alpha", "0.01"), ("eval", "ks", "[5, 10]")]


def test_yaml_values_are_converted_by_declared_type(tmp_path):
    path = _yaml(tmp_path, (
        "loss:\n  beta: 1e-4\n  alpha: 1\n"  # PyYAML reads 1e-4 as the string '1e-4'; 1 as an int
        "train:\n  epochs: '7'\n  lr: 5e-3\n  batch_size: 1e3\n"
        "model:\n  use_ssd: false\n  use_ip: 'yes'\n  n_layers: 2\n"
        "eval:\n  ks: [5, 20, 50]\n"
        "data:\n  modalities: {image: img.npy, audio: aud.npy}\n  name: 123\n"
    ))
    cfg = load_config(path)
    assert cfg.loss.beta == 0.0001 and type(cfg.loss.beta) is float
    assert cfg.loss.alpha == 1.0 and type(cfg.loss.alpha) is float
    assert cfg.train.epochs == 7 and type(cfg.train.epochs) is int
    assert cfg.train.lr == 0.005
    assert cfg.train.batch_size == 1000 and type(cfg.train.batch_size) is int
    assert cfg.model.use_ssd is False and cfg.model.use_ip is True and cfg.model.n_layers == 2
    assert cfg.eval.ks == [5, 20, 50]
    assert cfg.data.modalities == {"image": "img.npy", "audio": "aud.npy"}
    assert list(cfg.data.modalities) == ["image", "audio"]  # order is kept: it fixes the modality order
    assert cfg.data.name == "123"


def test_override_values_are_converted_by_declared_type():
    cfg = load_config(overrides=[
        "loss.beta=1e-4", "train.epochs=5", "model.use_ssd=false", "eval.ks=[5,20]",
        "data.modalities={image: a.npy, text: b.npy}", "train.device=cpu",
    ])
    assert cfg.loss.beta == 0.0001 and type(cfg.loss.beta) is float
    assert cfg.train.epochs == 5 and cfg.model.use_ssd is False and cfg.eval.ks == [5, 20]
    assert cfg.data.modalities == {"image": "a.npy", "text": "b.npy"} and cfg.train.device == "cpu"


@pytest.mark.parametrize(
    "override",
    ["train.epochs=1.5", "train.epochs=abc", "train.epochs=1.5e0", "model.use_ssd=maybe", "model.dropout=high",
     "eval.ks=[5,x]", "data.modalities=[a, b]", "model.embedding_dim=true"],
)
def test_values_that_do_not_fit_the_type_are_errors(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=[override])


def test_overrides_win_over_yaml(tmp_path):
    path = _yaml(tmp_path, "model:\n  n_layers: 3\n  dropout: 0.5\ntrain:\n  epochs: 9\n")
    cfg = load_config(path, ["model.n_layers=2", "train.epochs=4"])
    assert (cfg.model.n_layers, cfg.model.dropout, cfg.train.epochs) == (2, 0.5, 4)


@pytest.mark.parametrize(
    "override, key",
    [("model.dropout=-0.1", "model.dropout"), ("model.dropout=1.0", "model.dropout"),
     ("eval.ks=[10,0]", "eval.ks"), ("eval.ks=[-5]", "eval.ks"), ("eval.ks=[]", "eval.ks"),
     ("data.modalities={}", "data.modalities"), ("model.embedding_dim=0", "model.embedding_dim"),
     ("model.tau=0", "model.tau"), ("loss.alpha=-1", "loss.alpha"), ("train.lr=0", "train.lr"),
     ("model.name=bm4", "model.name"), ("train.metric=recall", "train.metric"),
     ("train.metric=auc@20", "train.metric")],
)
def test_impossible_values_are_errors(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=[override])


@pytest.mark.parametrize("metric", ["hit@10", "mrr@20", "precision@10", "map@20"])
def test_every_metric_may_select(metric):
    assert load_config(overrides=[f"train.metric={metric}"]).train.metric == metric


def test_ssd_needs_exactly_two_modalities():
    with pytest.raises(ConfigError, match="use_ssd needs exactly two modalities"):
        load_config(overrides=["data.modalities={image: image_feat.npy}"])
    cfg = load_config(overrides=["data.modalities={image: image_feat.npy}", "model.use_ssd=false"])
    assert cfg.data.modalities == {"image": "image_feat.npy"}
    # LightGCN uses no modality at all
    assert load_config(overrides=["model.name=lightgcn", "data.modalities={}"]).data.modalities == {}


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = _yaml(sub, "data:\n  root: ../data\ntrain:\n  out_dir: runs\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    cfg = load_config(path)
    assert Path(cfg.data.root) == (tmp_path / "data").resolve()
    assert Path(cfg.train.out_dir) == (sub / "runs").resolve()
    absolute = str(tmp_path / "abs")
    assert load_config(path, [f"data.root={absolute}"]).data.root == absolute


def test_bad_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_yaml(tmp_path, "model: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_yaml(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(ConfigError, match="'model' must be a mapping"):
        load_config(_yaml(tmp_path, "model: 3\n", "scalar.yaml"))
    assert load_config(_yaml(tmp_path, "", "empty.yaml")).model.name == "msi"


def test_a_saved_config_reloads_equal(tmp_path):
    cfg = load_config(overrides=["loss.beta=1e-3", "eval.ks=[5,20]", "model.use_ip=false"])
    write_config(tmp_path, cfg)  # a run directory's config.yaml
    assert load_config(tmp_path / "config.yaml") == cfg  # paths are absolute, so the folder does not matter
    assert config_from_dict(cfg.to_dict()) == cfg


def test_valid_keys_lists_every_field():
    keys = valid_keys()
    assert "loss.beta" in keys and "data.modalities" in keys and "eval.ks" in keys
    assert len(keys) == len(set(keys)) == sum(len(vars(s)) for s in vars(Config()).values())


@pytest.mark.parametrize(
    "path", SHIPPED or [pytest.param(None, marks=pytest.mark.skip(reason="configs/ holds no YAML yet"))],
    ids=[p.name for p in SHIPPED] or None,
)
def test_every_shipped_config_loads_and_builds_its_model(path):
    """Each YAML in configs/ loads, validates, and feeds the model constructor (on a 5-user, 4-item stand-in)."""
    cfg = load_config(path)
    rng = np.random.default_rng(0)
    train = np.array([[0, 0], [1, 1], [2, 2], [3, 3], [4, 0]])
    features = {m: rng.standard_normal((4, 3)).astype(np.float32) for m in cfg.data.modalities}
    empty = np.zeros((0, 2), dtype=np.int64)
    model = build_model(cfg, Dataset("stand-in", Path("."), 5, 4, train, empty, empty, features))
    assert type(model).__module__ == registry.get(cfg.model.name).build.__module__  # the class beside the builder


# ---- per-model keys: model.name decides which model.* and loss.* keys exist


def test_each_model_has_its_own_keys_and_defaults():
    lgcn = load_config(None, ["model.name=lightgcn"])
    assert lgcn.to_dict()["model"] == {"name": "lightgcn", "embedding_dim": 64, "n_layers": 1}
    assert lgcn.to_dict()["loss"] == {"gamma": 1e-4}
    assert load_config().to_dict()["loss"]["gamma"] == 0.1  # MSI's own default of its own key
    assert "model.tau" in valid_keys("msi") and "model.tau" not in valid_keys("lightgcn")


def test_the_last_model_name_decides_and_a_key_of_another_model_is_named(tmp_path):
    path = _yaml(tmp_path, "model:\n  name: msi\n  n_layers: 2\n")
    assert load_config(path, ["model.name=lightgcn"]).model.n_layers == 2  # a key both declare carries over
    path = _yaml(tmp_path, "model:\n  name: msi\n  tau: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.tau' for model\.name=lightgcn.*"
                                          r"it is a key of msi \(msi-train --list-keys model\.name=lightgcn"):
        load_config(path, ["model.name=lightgcn"])


def test_a_saved_config_of_an_older_msi_with_every_models_keys_still_opens():
    old = Config().to_dict()  # before per-model keys, a LightGCN run saved MSI's model and loss keys too
    old["model"]["name"] = "lightgcn"
    cfg = config_from_dict(old)
    assert cfg.to_dict()["model"] == {"name": "lightgcn", "embedding_dim": 64, "n_layers": 1}
    assert cfg.loss.gamma == 0.1  # the saved value of a key lightgcn declares is kept


def test_a_flat_dotted_key_at_the_top_level_says_that_keys_nest(tmp_path):
    path = _yaml(tmp_path, "train.epochs: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config section 'train\.epochs': keys nest under their section; "
                                          r"write 'train:' and under it '  epochs: \.\.\.'"):
        load_config(path)


def test_a_declared_check_and_choices_are_enforced():
    with pytest.raises(ConfigError, match=r"config key 'model\.code_placement' must be one of sample, mean"):
        load_config(None, ["model.code_placement=both"])
    with pytest.raises(ConfigError, match=r"config key 'loss\.gamma' must be >= 0 \(got -0\.5\)"):
        load_config(None, ["model.name=lightgcn", "loss.gamma=-0.5"])


# ---------------------------------------------------------------- resume overrides


def test_resume_config_changes_only_how_long_and_how_often():
    cfg = load_config(None, ["train.epochs=4"])
    new, changes = resume_config(cfg, ["train.epochs=8", "train.patience=3", "train.tensorboard=true"])
    assert (new.train.epochs, new.train.patience, new.train.tensorboard) == (8, 3, True)
    assert new.model == cfg.model and new.train.lr == cfg.train.lr
    assert changes == ["train.epochs=8 (was 4)", "train.patience=3 (was 20)", "train.tensorboard=True (was False)"]
    assert resume_config(cfg, []) == (cfg, [])
    for bad in ("train.lr=0.1", "model.dropout=0.1", "data.name=x"):
        with pytest.raises(ConfigError, match=f"--resume cannot change '{bad.partition('=')[0]}'"):
            resume_config(cfg, [bad])
    with pytest.raises(ConfigError, match="train.epochs"):
        resume_config(cfg, ["train.epochs=0"])
    with pytest.raises(ConfigError, match="train.patience"):
        resume_config(cfg, ["train.patience=many"])
    assert changed_keys(cfg, new) == ["train.epochs", "train.patience", "train.tensorboard"]
