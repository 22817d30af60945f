"""The model registry: each model name maps to one builder ``build(cfg, data) -> Recommender`` and the config
keys the model declares.

    @dataclass
    class MFModel:  # model.* keys of model.name=mf
        embedding_dim: int = key(64, "d: size of the user and item embeddings", check=">0")

    @msi.models.register("mf", item_features=False, model=MFModel)
    def build(cfg: Config, data: Dataset) -> Recommender: ...

A model declares its own ``model.*`` keys (``model=``, a dataclass whose fields are made with ``key``) and its own
``loss.*`` keys (``loss=``); the registry adds ``model.name`` in front of them. ``msi.config`` reads, converts and
checks every key by these declarations (``key``'s ``check`` and ``choices``, then the dataclass's own
``validate(cfg)`` for a rule across keys), so a plugin's keys are typed, checked, listed by
``msi-train --list-keys model.name=NAME`` and written to a run's config.yaml like the built-in ones.

The rest of the library asks only this module: ``msi.config.validate`` checks ``model.name`` here (with a
did-you-mean), ``msi.runtime.dataset_for`` asks whether the model reads item features, ``msi.models.build_model`` calls
the builder. A third-party package adds a model by declaring an entry point in the group ``msi.models`` whose name
is the model's name and whose value is the module that registers it (``mf = "msi_mf.model"``); once it is
installed, ``model.name=mf`` works in every tool. docs/adding_a_model.md walks through it.

Layering. This module sits on the bottom layer beside ``msi.errors`` and imports no other msi module, so the
models may import it (to register) and ``msi.config`` may import both without a cycle:
- the built-in models register when ``msi.models`` is imported, which ``msi.config`` does;
- a plugin's entry point is loaded (imported) once, when its name is first looked up: a plugin that is never asked
  for is never imported, and one that fails to import breaks only its own name, with a one-line ``MSIError``
  naming the entry point.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, NamedTuple

from msi.errors import ConfigError, MSIError, raised, shown

GROUP = "msi.models"  # the entry-point group of model plugins
DEFAULT = "msi"  # model.name when a config names none
CHECKS = {  # key(check=...) -> (the test, the words of the error)
    ">0": (lambda v: v > 0, "must be > 0"),
    ">=0": (lambda v: v >= 0, "must be >= 0"),
    "[0,1)": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "(0,1]": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "[0,1]": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
}


def key(default: Any, help: str, *, check: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A config key: a dataclass field with its default, a one-line description (``--list-keys``), and an optional
    range ``check`` (one of ``CHECKS``: ">0", ">=0", "[0,1)", "(0,1]", "[0,1]") or allowed ``choices``."""
    if check is not None and check not in CHECKS:
        raise MSIError(f"key(check={check!r}): check must be one of {', '.join(CHECKS)}")
    meta = {"help": help, "check": check, "choices": tuple(choices) if choices else None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def key_types(cls: type) -> dict[str, Any]:
    """A keys dataclass's field name -> declared type (annotations resolved, ``from __future__`` or not)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _section(name: str, section: str, declared: type | None) -> type:
    """The dataclass of one model's ``model`` or ``loss`` section: ``model.name`` (model section only) then the
    declared keys, with the declared ``validate`` method."""
    if declared is not None and not dataclasses.is_dataclass(declared):
        raise MSIError(f"register({name!r}, {section}=...): {declared!r} is not a dataclass of key(...) fields")
    fields: list[tuple[str, Any, Any]] = []
    if section == "model":
        fields.append(("name", str, key(name, "the registered model (msi-train --list-keys model.name=NAME "
                                              "lists its keys)")))
    namespace = {}
    if declared is not None:
        types = key_types(declared)
        for f in dataclasses.fields(declared):
            if f.name == "name" and section == "model":
                raise MSIError(f"register({name!r}): 'name' is model.name itself; give the key another name")
            fields.append((f.name, types[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                                         metadata=f.metadata)))
        if hasattr(declared, "validate"):
            namespace["validate"] = declared.validate
    title = "".join(part.capitalize() for part in name.replace("-", "_").split("_")) or "Model"
    return dataclasses.make_dataclass(f"{title}{section.capitalize()}Keys", fields, namespace=namespace)

Builder = Callable[[Any, Any], Any]  # (Config, Dataset) -> Recommender; typed loosely: those live above this layer


class ModelEntry(NamedTuple):
    """One registered model: its name, its builder, and whether it reads the item features of ``data.modalities``
    (False: the data set is loaded without them and ``data.modalities`` may be empty)."""

    name: str
    build: Builder
    item_features: bool
    model: type  # the dataclass of the model.* keys (model.name first)
    loss: type  # the dataclass of the loss.* keys (may have none)


_ENTRIES: dict[str, ModelEntry] = {}
_LOADED: set[str] = set()  # entry points already imported, by name


def register(
    name: str, *, item_features: bool = True, model: type | None = None, loss: type | None = None
) -> Callable[[Builder], Builder]:
    """Decorator: register ``build(cfg, data) -> Recommender`` under ``name`` with the dataclasses of its ``model.*``
    and ``loss.*`` keys (fields made with ``key``); a name taken already is an error."""

    def decorate(build: Builder) -> Builder:
        if name in _ENTRIES:
            raise MSIError(f"model {shown(name)} is registered twice: by {_where(_ENTRIES[name].build)} and by "
                           f"{_where(build)}")
        _ENTRIES[name] = ModelEntry(name, build, item_features, _section(name, "model", model),
                                    _section(name, "loss", loss))
        return build

    return decorate


def names() -> list[str]:
    """Every model name: the registered ones and those that installed plugins declare (not imported here)."""
    return sorted(set(_ENTRIES) | set(_plugin_points()))


def get(name: str) -> ModelEntry:
    """The model registered as ``name``, importing its plugin on first use; an unknown name is a ConfigError about
    ``model.name`` with the closest registered name."""
    points = _plugin_points().get(name, [])
    if len(points) > 1:
        raise MSIError(f"model {shown(name)} is declared by {len(points)} plugins: "
                       f"{', '.join(map(_describe, points))}; uninstall all but one")
    if points and name not in _LOADED:
        _load_plugin(points[0])
    if name not in _ENTRIES:
        known = {n.lower(): n for n in names()}
        close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.5)
        hint = f"; did you mean {shown(known[close[0]])}?" if close else ""
        raise ConfigError(f"config key 'model.name': no model named {shown(name)}{hint} (models: {', '.join(names())}; "
                          f"a plugin adds one through the entry-point group '{GROUP}')")
    return _ENTRIES[name]


@lru_cache(maxsize=None)
def _plugin_points() -> dict[str, list[EntryPoint]]:
    """Entry points of the group, by name, read once per process from the installed packages' metadata."""
    out: dict[str, list[EntryPoint]] = {}
    for point in entry_points(group=GROUP):
        out.setdefault(point.name, []).append(point)
    return out


def _load_plugin(point: EntryPoint) -> None:
    try:
        point.load()
    except MSIError:
        raise
    except Exception as e:  # any failure inside a third party's import: one line that names the entry point
        raise MSIError(f"model plugin {_describe(point)} failed to import ({raised(e)})") from None
    _LOADED.add(point.name)
    if point.name not in _ENTRIES:
        raise MSIError(f"model plugin {_describe(point)} registered no model named {shown(point.name)}: decorate its "
                       f"builder with @msi.models.register({shown(point.name)})")


def _describe(point: EntryPoint) -> str:
    dist = f" of {point.dist.name}" if point.dist is not None else ""
    return f"'{point.name} = {point.value}'{dist} (entry-point group {GROUP})"


def _where(build: Builder) -> str:
    return f"{getattr(build, '__module__', '?')}.{getattr(build, '__qualname__', build)}"


__all__ = ["CHECKS", "DEFAULT", "GROUP", "ModelEntry", "get", "key", "key_types", "names", "register"]
