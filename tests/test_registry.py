"""msi.registry: registering, looking up with did-you-mean, plugins through the entry-point group ``msi.models``
(a failing one is a one-line error), and a plugin package installed by the test that msi-train, msi-eval and
msi-recommend drive end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from msi import registry
from msi.cli import train_main
from msi.config import load_config
from msi.data.dataset import Dataset
from msi.errors import ConfigError, MSIError
from msi.models import LightGCN, build_model, register
from msi.runtime import dataset_for
from tests.conftest import recommended_train_pairs

TRAIN = np.array([[0, 0], [0, 1], [1, 1], [2, 2]])  # 3 users, 3 items
EMPTY = np.zeros((0, 2), dtype=np.int64)


@pytest.fixture
def clean_registry(monkeypatch):
    """The registry as it is, restored after the test, with no installed plugin in sight."""
    monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))
    monkeypatch.setattr(registry, "_LOADED", set())
    monkeypatch.setattr(registry, "_plugin_points", lambda: {})
    return monkeypatch


def fake_plugins(monkeypatch, *points: tuple[str, str]) -> None:
    """Installed plugins as far as the registry can tell: (name, value) entry points of the group."""
    table: dict[str, list[EntryPoint]] = {}
    for name, value in points:
        table.setdefault(name, []).append(EntryPoint(name=name, value=value, group=registry.GROUP))
    monkeypatch.setattr(registry, "_plugin_points", lambda: table)


def write_module(tmp_path: Path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


# ---------------------------------------------------------------- the registry itself


def test_built_in_models_are_registered():
    assert {"msi", "lightgcn"} <= set(registry.names())
    assert registry.get("msi").item_features and not registry.get("lightgcn").item_features


def test_a_name_registered_twice_is_refused(clean_registry):
    @register("twice")
    def first(cfg, data):
        return None

    with pytest.raises(MSIError, match=r"model 'twice' is registered twice: by .*first and by .*second"):
        @register("twice")
        def second(cfg, data):
            return None

    assert registry.get("twice").build is first
    with pytest.raises(MSIError, match="'msi' is registered twice"):
        register("msi")(first)


@pytest.mark.parametrize("typo, suggestion", [("lightgnc", "lightgcn"), ("MSI", "msi"), ("msii", "msi")])
def test_a_model_name_typo_is_a_config_error_with_did_you_mean(typo, suggestion):
    with pytest.raises(ConfigError, match=rf"'model.name': no model named '{typo}'; did you mean '{suggestion}'\?"):
        load_config(overrides=[f"model.name={typo}"])


def test_did_you_mean_knows_installed_plugins_without_importing_them(clean_registry):
    fake_plugins(clean_registry, ("matrix-factorization", "no_such_module_anywhere"))
    assert "matrix-factorization" in registry.names()
    with pytest.raises(ConfigError, match="did you mean 'matrix-factorization'"):
        registry.get("matrix-factorisation")


def test_a_plugin_that_fails_to_import_is_a_one_line_error(clean_registry, tmp_path, capsys):
    fake_plugins(clean_registry, ("broken", "msi_plugin_not_installed_anywhere"), ("other", "also_missing"))
    with pytest.raises(MSIError) as info:
        registry.get("broken")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("model plugin 'broken = msi_plugin_not_installed_anywhere' (entry-point group "
                              "msi.models) failed to import (ModuleNotFoundError: No module named")
    # through a tool: one line on stderr, exit status 2, at config-load time
    (tmp_path / "c.yaml").write_text("model:\n  name: broken\n")
    assert train_main(["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model plugin 'broken = msi_plugin_not_installed_anywhere'")
    # a broken plugin breaks only its own name
    assert load_config().model.name == "msi"


def test_a_plugin_that_raises_inside_its_import_names_the_error(clean_registry, tmp_path):
    write_module(tmp_path, clean_registry, "msi_raises_plugin", """
        raise RuntimeError("CUDA extension not built\\nsee the install notes")
    """)
    fake_plugins(clean_registry, ("raises", "msi_raises_plugin"))
    with pytest.raises(MSIError, match=r"failed to import \(RuntimeError: CUDA extension not built see the install"
                                       r" notes\)$"):
        registry.get("raises")


def test_a_plugin_must_register_its_entry_point_name(clean_registry, tmp_path):
    write_module(tmp_path, clean_registry, "msi_silent_plugin", "VALUE = 1\n")
    fake_plugins(clean_registry, ("silent", "msi_silent_plugin"))
    with pytest.raises(MSIError, match=r"registered no model named 'silent': decorate its builder with "
                                       r"@msi.models.register\('silent'\)"):
        registry.get("silent")


def test_two_plugins_declaring_one_name_are_refused(clean_registry):
    fake_plugins(clean_registry, ("mf", "first_pkg"), ("mf", "second_pkg"))
    with pytest.raises(MSIError, match="model 'mf' is declared by 2 plugins: 'mf = first_pkg'.*'mf = second_pkg'"):
        registry.get("mf")


def test_a_plugin_that_claims_a_built_in_name_is_refused(clean_registry, tmp_path):
    write_module(tmp_path, clean_registry, "msi_usurper_plugin", """
        from msi.models import register

        @register("msi")
        def build(cfg, data):
            raise AssertionError("never built")
    """)
    fake_plugins(clean_registry, ("msi", "msi_usurper_plugin"))
    with pytest.raises(MSIError, match=r"model 'msi' is registered twice: by msi.models.msi.build and by "
                                       r"msi_usurper_plugin.build"):
        load_config()


def test_a_plugin_is_imported_once_and_only_when_asked_for(clean_registry, tmp_path):
    write_module(tmp_path, clean_registry, "msi_lazy_plugin", """
        from msi.models import register

        @register("lazy", item_features=False)
        def build(cfg, data):
            raise AssertionError("not built in this test")
    """)
    fake_plugins(clean_registry, ("lazy", "msi_lazy_plugin"))
    load_config()  # another model: the plugin is not imported
    assert "msi_lazy_plugin" not in sys.modules
    cfg = load_config(overrides=["model.name=lazy", "data.modalities={}"])  # it reads no features: none needed
    assert "msi_lazy_plugin" in sys.modules and cfg.data.modalities == {}
    assert registry.get("lazy").item_features is False  # a second import would have registered "lazy" twice


def test_build_model_refuses_a_builder_that_returns_no_recommender(clean_registry):
    register("not-a-model")(lambda cfg, data: torch.nn.Linear(2, 2))
    cfg = load_config(overrides=["model.name=not-a-model"])
    data = Dataset("three", Path("."), 3, 3, TRAIN, EMPTY, EMPTY, {})
    with pytest.raises(MSIError, match="the builder of model 'not-a-model' returned a Linear, not a "
                                       "msi.models.Recommender"):
        build_model(cfg, data)


def test_a_model_without_item_features_loads_none(tmp_path):
    cfg = load_config(overrides=["model.name=lightgcn", f"data.root={tmp_path}", "data.name=tiny",
                                 "data.synth_preset=tiny"])
    assert cfg.data.modalities  # the defaults stay in the config ...
    data = dataset_for(cfg, progress=False)
    assert data.features == {}  # ... but a model that reads none gets none
    assert isinstance(build_model(cfg, data), LightGCN)


# ---------------------------------------------------------------- a plugin package, installed and driven by the CLI

PLUGIN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "msi-suite-plugin-example"
version = "0.1.0"
dependencies = ["msi"]

[project.entry-points."msi.models"]
msi-suite-mf = "msi_suite_plugin_example"

[tool.setuptools]
py-modules = ["msi_suite_plugin_example"]
"""

PLUGIN_MODULE = '''\
"""Matrix factorisation with BPR: s(u, i) = <p_u, q_i>, n uniformly drawn negatives per positive."""

from dataclasses import dataclass

import torch
from torch import nn

from msi.losses import bpr_loss
from msi.models import Recommender, key, register


class MF(Recommender):
    param_groups = {"user": "embeddings", "item": "embeddings"}

    def __init__(self, n_users: int, n_items: int, embedding_dim: int = 64, n_negatives: int = 1,
                 init_std: float = 0.1, gamma: float = 1e-4) -> None:
        super().__init__()
        self.n_items, self.n_negatives, self.gamma = n_items, n_negatives, gamma
        self.user = nn.Parameter(nn.init.normal_(torch.empty(n_users, embedding_dim), std=init_std))
        self.item = nn.Parameter(nn.init.normal_(torch.empty(n_items, embedding_dim), std=init_std))

    @torch.no_grad()
    def embeddings(self) -> dict[str, torch.Tensor]:
        return {"user": self.user.detach(), "id": self.item.detach()}

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        neg = torch.randint(0, self.n_items, (len(items), self.n_negatives), device=items.device)  # (B, n)
        u, i, j = self.user[users], self.item[items], self.item[neg]  # (B, d), (B, d), (B, n, d)
        pos = (u * i).sum(-1, keepdim=True).expand(-1, self.n_negatives)  # (B, n)
        bpr = bpr_loss(pos, (u.unsqueeze(1) * j).sum(-1))
        reg = (u.pow(2).sum() + i.pow(2).sum() + j.pow(2).sum() / self.n_negatives) / (2 * len(users))
        return {"bpr": bpr, "reg": reg, "loss": bpr + self.gamma * reg}


@dataclass
class MFModel:
    embedding_dim: int = key(64, "d: size of the user and item embeddings", check=">0")
    n_negatives: int = key(1, "negatives drawn per positive pair", check=">0")
    init_std: float = key(0.1, "standard deviation of the normal initialisation", check=">0")


@dataclass
class MFLoss:
    gamma: float = key(1e-4, "L2 weight of the batch's embeddings", check=">=0")


@register("msi-suite-mf", item_features=False, model=MFModel, loss=MFLoss)
def build(cfg, data) -> MF:
    m = cfg.model
    return MF(data.n_users, data.n_items, embedding_dim=m.embedding_dim, n_negatives=m.n_negatives,
              init_std=m.init_std, gamma=cfg.loss.gamma)
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The plugin package written here and installed with pip (offline) into a folder of its own."""
    root = tmp_path_factory.mktemp("plugin")
    pkg, site = root / "pkg", root / "site"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (pkg / "msi_suite_plugin_example.py").write_text(PLUGIN_MODULE)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--target", str(site), str(pkg)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"pip could not build the plugin offline: {done.stderr.strip().splitlines()[-1:]}")
    return site


def cli(workdir: Path, site: Path | None, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "msi.cli", *argv], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def plugin_run(plugin_site, tmp_path_factory) -> tuple[Path, Path]:
    """(work folder, run folder) of msi-train with model.name=msi-suite-mf on generated tiny data, no item features."""
    work = tmp_path_factory.mktemp("plugin-run")
    (work / "tiny.yaml").write_text(
        "data:\n  root: data\n  name: tiny\n  synth_preset: tiny\n  modalities: {}\n"
        "model:\n  name: msi-suite-mf\n  embedding_dim: 16\n  n_negatives: 2\n"
        "loss:\n  gamma: 0.001\n"
        "train:\n  epochs: 3\n  lr: 0.01\n  device: cpu\n  out_dir: runs\n  run_name: mf\n"
        "eval:\n  ks: [10, 20]\n"
    )
    done = cli(work, plugin_site, "train", "--config", "tiny.yaml", "--quiet")
    assert done.returncode == 0, done.stderr
    return work, work / "runs" / "mf"


def test_the_plugin_is_unknown_without_its_package(plugin_run):
    work, _ = plugin_run
    done = cli(work, None, "train", "--config", "tiny.yaml", "--out", "elsewhere")
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config key 'model.name': no model named 'msi-suite-mf'"), err


def test_msi_train_trains_the_plugin_model(plugin_run):
    _, run_dir = plugin_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all({"bpr", "reg", "loss", "grad_embeddings"} <= set(r) for r in rows)  # its loss terms, its groups
    assert not any(k.startswith("grad_other") for r in rows for k in r)
    results = json.loads((run_dir / "results.json").read_text())
    assert 0 < results["test"]["recall@20"] <= 1  # better than nothing on tiny after 3 epochs


def test_the_plugin_declares_its_own_keys(plugin_run, plugin_site):
    work, run_dir = plugin_run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"] == {"name": "msi-suite-mf", "embedding_dim": 16, "n_negatives": 2, "init_std": 0.1}
    assert saved["loss"] == {"gamma": 0.001}
    listed = cli(work, plugin_site, "train", "--list-keys", "model.name=msi-suite-mf")
    assert listed.returncode == 0, listed.stderr
    assert "model.n_negatives: 1" in listed.stdout and "negatives drawn per positive pair" in listed.stdout
    assert "model.dropout" not in listed.stdout and "loss.alpha" not in listed.stdout  # MSI's keys are MSI's
    bad = cli(work, plugin_site, "train", "--config", "tiny.yaml", "--out", "bad", "model.n_negatives=0")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: config key 'model.n_negatives' must be > 0 (got 0)"
    other = cli(work, plugin_site, "train", "--config", "tiny.yaml", "--out", "bad", "model.tau=0.5")
    assert other.returncode == 2 and "unknown config key 'model.tau' for model.name=msi-suite-mf" in other.stderr
    assert "it is a key of msi" in other.stderr and not (work / "bad").exists()


def test_msi_eval_scores_the_plugin_checkpoint(plugin_run, plugin_site):
    work, run_dir = plugin_run
    done = cli(work, plugin_site, "eval", "--checkpoint", str(run_dir / "best.pt"), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    results = json.loads((run_dir / "results.json").read_text())
    assert metrics["split"] == "valid"  # the default: test is read once, by msi-train
    assert metrics["recall@20"] == pytest.approx(results["valid"]["recall@20"], abs=1e-6)


def test_msi_recommend_lists_unseen_items_of_the_plugin_model(plugin_run, plugin_site):
    work, run_dir = plugin_run
    out = work / "recs.tsv"
    done = cli(work, plugin_site, "recommend", "--checkpoint", str(run_dir / "best.pt"), "--device", "cpu",
               "--k", "5", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows, seen = recommended_train_pairs(out, work / "data" / "tiny" / "tiny.inter")
    assert rows and {r["rank"] for r in rows} <= {"1", "2", "3", "4", "5"}
    assert not seen
