"""Generated data sets in the MMRec layout, with planted structure that models can be told apart by.

Items belong to topics in a k-dimensional latent space (unit item factors Q, I x k); users have unit
factors P (U x k) near one topic. User u picks its items without replacement from

    p(i | u)  ∝  pop_i * exp(s * <p_u, q_i>)          (s = `affinity_scale`, pop_i long-tailed)

and each modality m sees factors, a nuisance and its own noise; where the preference signal lives is the
preset's `signal`:

    mixed     X_m = Q W_m + a * N V_m + sigma_m * E_m        both modalities carry Q and one shared nuisance N
    shared    X_m = Q W_m + a * N_m V_m + sigma_m * E_m      both carry Q; each adds a nuisance N_m of its own
    specific  X_m = Q_m W_m + a * N V_m + sigma_m * E_m      image carries the first half of Q's factors, text the
                                                             second half (Q_m, scaled to keep std 1); N is shared

(N, N_m: I x nuisance_dim, drawn once per item.) A nuisance never touches the interactions. `shared` is the case
the MSI paper argues for (what the modalities share is what matters); in `specific` what they share is noise.
Every random draw comes from a generator keyed by (seed, stream, chunk), and the arithmetic that feeds
the files is elementwise in a fixed order (no BLAS), so the bytes depend on the seed alone: not on
thread counts, BLAS builds or how much memory there is.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from msi.console import progress_bar
from msi.data.dataset import INTER_HEADER, check_data_set_name
from msi.errors import ConfigError, DataError, shown
from msi.files import temporary_path

# Stream ids: each kind of draw has its own generator, so changing one step leaves the others' bytes alone.
_LATENTS, _DEGREES, _INTERACTIONS, _COVER, _SPLIT, _MAPS, _NOISE, _OWN_NUISANCE = range(8)
SIGNALS = ("mixed", "shared", "specific")
_USER_CHUNK = 4096  # users per interaction-sampling chunk
_FEATURE_CHUNK_VALUES = 1 << 22  # feature values (rows x width) per written chunk
_INTER_CHUNK = 1 << 18  # .inter rows formatted per write
_OVERSAMPLE = 32  # first-round proposals per missing item; doubles on every later round
_T0, _T_SPAN = 1_300_000_000, 300_000_000  # timestamps: seconds in [2011, 2020)


@dataclass(frozen=True)
class SynthPreset:
    """Sizes and knobs of one generated data set."""

    n_users: int
    n_items: int
    n_interactions: int  # target; the written count is within about 2% of it
    image_dim: int
    text_dim: int
    n_factors: int = 16  # k, the latent dimension
    n_topics: int = 16  # clusters of item (and user) factors
    nuisance_dim: int = 8  # width of the shared, interaction-free item vector N
    affinity_scale: float = 5.0  # s: inverse temperature of the user-item affinity, in [0, 10]
    popularity_sigma: float = 1.1  # lognormal sigma of item popularity
    degree_sigma: float = 1.0  # lognormal sigma of the number of items per user
    min_degree: int = 5  # every user has at least this many items (a 5-core-like set)
    item_spread: float = 0.5  # scatter of item factors around their topic centre
    user_spread: float = 0.7  # scatter of user factors around their topic centre
    nuisance_scale: float = 1.0  # a: per-value std of the nuisance part (the factor part has std 1)
    image_noise: float = 2.0  # sigma of the image-only noise
    text_noise: float = 1.0  # sigma of the text-only noise
    signal: str = "mixed"  # where the preference factors live: mixed | shared | specific (module docstring)

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            raise ConfigError(f"SynthPreset.signal must be one of {', '.join(SIGNALS)}, got {shown(self.signal)}")
        for key in ("n_users", "n_items", "n_interactions", "image_dim", "text_dim", "n_factors",
                    "n_topics", "nuisance_dim", "min_degree"):
            if getattr(self, key) < 1:
                raise ConfigError(f"SynthPreset.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("popularity_sigma", "degree_sigma", "item_spread", "user_spread", "nuisance_scale",
                    "image_noise", "text_noise"):
            if getattr(self, key) < 0:
                raise ConfigError(f"SynthPreset.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.affinity_scale <= 10:  # sampling accepts about exp(-s) of its proposals
            raise ConfigError(f"SynthPreset.affinity_scale must lie in [0, 10], got {self.affinity_scale}")
        if self.n_items < 2 * self.min_degree:
            raise ConfigError(f"SynthPreset.n_items must be >= 2 * min_degree = {2 * self.min_degree}")
        low, high = self.n_users * self.min_degree, self.n_users * (self.n_items // 2)
        if not low <= self.n_interactions <= high:
            raise ConfigError(f"SynthPreset.n_interactions must lie in [{low}, {high}] "
                              f"(min_degree per user, at most half the items each), got {self.n_interactions}")


PRESETS: dict[str, SynthPreset] = {
    "tiny": SynthPreset(60, 40, 600, image_dim=32, text_dim=16, n_topics=4, image_noise=1.0, text_noise=0.5),
    "quickstart": SynthPreset(1500, 800, 25_000, image_dim=256, text_dim=64, n_topics=12, image_noise=1.0,
                              text_noise=0.5),
    "baby": SynthPreset(19_445, 7_050, 160_792, image_dim=4096, text_dim=384, n_topics=32),
    "sports": SynthPreset(35_598, 18_357, 296_337, image_dim=4096, text_dim=384, n_topics=48),
    "elec": SynthPreset(192_403, 63_001, 1_689_188, image_dim=4096, text_dim=384, n_topics=64),
}


@dataclass(frozen=True)
class Latents:
    """The ground truth behind one generated data set (float64 arrays)."""

    user_factors: np.ndarray  # (U, k), unit rows
    item_factors: np.ndarray  # (I, k), unit rows
    nuisance: np.ndarray  # (I, nuisance_dim), shared by both modalities, unused by interactions
    popularity: np.ndarray  # (I,) positive weights, lognormal


def resolve_preset(preset: str | SynthPreset) -> SynthPreset:
    """Return `preset` itself or the named entry of PRESETS; DataError for an unknown name."""
    if isinstance(preset, SynthPreset):
        return preset
    if preset not in PRESETS:
        raise DataError(f"unknown synthetic preset {shown(preset)}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[preset]


def latents(preset: str | SynthPreset, seed: int = 0) -> Latents:
    """Draw the latent factors, nuisance and popularity that `generate` uses for this seed."""
    p = resolve_preset(preset)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {shown(seed)}")
    rng = _rng(seed, _LATENTS)
    centres = _unit(rng.standard_normal((p.n_topics, p.n_factors)))  # (T, k)
    item_topic = rng.integers(p.n_topics, size=p.n_items)
    scatter = rng.standard_normal((p.n_items, p.n_factors)) / np.sqrt(p.n_factors)
    item_factors = _unit(centres[item_topic] + p.item_spread * scatter)
    user_topic = rng.integers(p.n_topics, size=p.n_users)
    scatter = rng.standard_normal((p.n_users, p.n_factors)) / np.sqrt(p.n_factors)
    user_factors = _unit(centres[user_topic] + p.user_spread * scatter)
    nuisance = rng.standard_normal((p.n_items, p.nuisance_dim))
    popularity = rng.lognormal(0.0, p.popularity_sigma, size=p.n_items)
    return Latents(user_factors, item_factors, nuisance, popularity)


def item_factors(preset: str | SynthPreset, seed: int = 0) -> np.ndarray:
    """The ground-truth item factors Q, shape (I, k); row r belongs to itemID r."""
    return latents(preset, seed).item_factors


def generate(preset: str | SynthPreset, out_dir: str | Path, seed: int = 0, name: str | None = None,
             progress: bool = True, signal: str | None = None, overwrite: bool = False) -> Path:
    """Write `<name>.inter`, `image_feat.npy` (I, image_dim) and `text_feat.npy` (I, text_dim) into
    `out_dir` and return the path of the `.inter` file. `name` defaults to the basename of `out_dir`.
    The same (preset, seed) always gives the same bytes. `signal` (mixed | shared | specific) replaces
    the preset's own.

    `out_dir` must be missing or empty; `overwrite` replaces the data set in it (its files are removed,
    and a file that belongs to no data set is refused). The files are written into a folder beside
    `out_dir` and moved in when all are complete: an interrupted or failed run (a full disk is a
    DataError naming the file) leaves `out_dir` as it was."""
    p = resolve_preset(preset)
    if signal is not None:
        p = replace(p, signal=signal)
    lat = latents(p, seed)
    out = Path(out_dir)
    name = name or out.resolve().name
    check_data_set_name(name)
    _earlier_data_set(out, overwrite)
    users, items = _interactions(p, lat, seed, progress)
    users, items, stamps, labels = _split(users, items, p.n_users, seed)
    staging = temporary_path(out.resolve())
    inter_name = f"{name}.inter"
    try:
        with _naming(out / inter_name, out):
            staging.mkdir(parents=True)
            _write_inter(staging / inter_name, users, items, stamps, labels, progress)
        for modality, (fname, dim, noise) in enumerate([("image_feat.npy", p.image_dim, p.image_noise),
                                                        ("text_feat.npy", p.text_dim, p.text_noise)]):
            with _naming(out / fname, out):
                _write_features(staging / fname, lat, p, seed, modality, dim, noise, progress)
        earlier = _earlier_data_set(out, overwrite)  # again: another process may have written there meanwhile
        with _naming(out, out):
            _move_in(staging, out, earlier, inter_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / inter_name


def _is_data_set_file(name: str) -> bool:
    """A file of a data set in the MMRec layout (or a leftover of an interrupted write of one)."""
    return name.endswith((".inter", ".npy", ".part")) or name in ("u_id_mapping.csv", "i_id_mapping.csv",
                                                                  "prepare.json")


def _earlier_data_set(out: Path, overwrite: bool) -> list[Path]:
    """The files in `out` that `generate` replaces: none when `out` is missing or empty. Files there
    without `overwrite`, or files that belong to no data set, are a DataError."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise DataError(f"{out}: is a file, not a folder for a data set")
    present = sorted(p.name for p in out.iterdir())
    shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
    if present and not overwrite:
        raise DataError(f"{out}: already holds {shown}; msi-data synth --overwrite replaces the data set there")
    foreign = [n for n in present if not _is_data_set_file(n) or not (out / n).is_file()]
    if foreign:
        raise DataError(f"{out}: holds {', '.join(foreign[:5])}, not part of a data set; --overwrite replaces only "
                        "a data set's files: move them, or choose another folder")
    return [out / n for n in present]


@contextmanager
def _naming(path: Path, out: Path) -> Iterator[None]:
    """An OSError (a full disk) while writing `path` becomes a DataError naming it."""
    try:
        yield
    except OSError as e:
        raise DataError(f"{path}: could not write ({e.strerror or e}); {out} is left as it was") from None


def _move_in(staging: Path, out: Path, earlier: list[Path], inter_name: str) -> None:
    """Put the complete files of `staging` into `out`, the `.inter` last: `earlier` files go first, so
    that a crash in between leaves no `.inter` that could be read with features of the other data set."""
    if not out.exists():
        staging.rename(out)
        return
    for path in sorted(earlier, key=lambda p: not p.name.endswith(".inter")):
        path.unlink()
    for path in sorted(staging.iterdir(), key=lambda p: p.name == inter_name):
        path.replace(out / path.name)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *stream])


def _pair_dot(a_cols: np.ndarray, ia: np.ndarray, b_cols: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Dot products <a[ia[n]], b[ib[n]]>, shape (N,), from column-major factors a_cols (k, A) and
    b_cols (k, B), summed column by column in a fixed order (the same bytes on any machine)."""
    out = a_cols[0][ia] * b_cols[0][ib]
    for j in range(1, a_cols.shape[0]):
        out += a_cols[j][ia] * b_cols[j][ib]
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of x (N, k) scaled to unit length."""
    rows = np.arange(x.shape[0])
    return x / np.sqrt(_pair_dot(x.T, rows, x.T, rows))[:, None]


def _alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table for drawing index i with probability weights[i] / sum(weights) in O(1):
    draw j uniformly, keep it with probability prob[j], else take alias[j]. Returns (prob, alias), (n,)."""
    n = weights.size
    prob = (weights * (n / weights.sum())).tolist()
    alias = np.arange(n)
    small = [j for j in range(n) if prob[j] < 1.0]
    large = [j for j in range(n) if prob[j] >= 1.0]
    while small and large:
        s, big = small.pop(), large.pop()
        alias[s] = big
        prob[big] -= 1.0 - prob[s]
        (small if prob[big] < 1.0 else large).append(big)
    for j in small + large:  # leftovers hold (up to rounding) exactly one unit
        prob[j] = 1.0
    return np.array(prob), alias


def _degrees(p: SynthPreset, seed: int) -> np.ndarray:
    """Items per user, shape (U,): min_degree plus a lognormal tail, capped at half the items,
    scaled so the total is close to n_interactions."""
    raw = _rng(seed, _DEGREES).lognormal(0.0, p.degree_sigma, size=p.n_users)
    extra = p.n_interactions - p.min_degree * p.n_users
    cap = p.n_items // 2
    scale = extra / raw.sum()
    for _ in range(20):  # fixed point: flooring and the cap both lower the total
        degrees = np.minimum(p.min_degree + np.floor(raw * scale).astype(np.int64), cap)
        got = int(degrees.sum()) - p.min_degree * p.n_users
        if got == extra or got == 0:
            break
        scale *= extra / got
    return degrees


def _interactions(p: SynthPreset, lat: Latents, seed: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sample every user's items in chunks of users; returns (users, items), both (N,) int64."""
    degrees = _degrees(p, seed)
    alias = _alias_table(lat.popularity)
    cols = (np.ascontiguousarray(lat.user_factors.T), np.ascontiguousarray(lat.item_factors.T))  # (k, U), (k, I)
    starts = range(0, p.n_users, _USER_CHUNK)
    users, items = [], []
    for c, start in enumerate(progress_bar(starts, desc="interactions", unit="chunk", show=progress)):
        chunk = np.arange(start, min(start + _USER_CHUNK, p.n_users))
        u, i = _sample_chunk(_rng(seed, _INTERACTIONS, c), cols, chunk, degrees[chunk], alias, p.affinity_scale)
        users.append(u)
        items.append(i)
    users, items = np.concatenate(users), np.concatenate(items)
    return _cover_items(users, items, lat, seed)


def _sample_chunk(rng: np.random.Generator, cols: tuple[np.ndarray, np.ndarray], users: np.ndarray,
                  degrees: np.ndarray, alias: tuple[np.ndarray, np.ndarray],
                  scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Draw degrees[n] distinct items for users[n] by rejection: propose i ~ pop (alias table), accept
    with probability exp(scale * (<p_u, q_i> - 1)) (<= 1 for unit factors). Keeping the first distinct
    accepted draws in order is exactly sequential sampling without replacement."""
    (user_cols, item_cols), (prob, alias_of) = cols, alias
    n_items = prob.size
    drawn_u, drawn_i = np.empty(0, np.int64), np.empty(0, np.int64)
    left, need, factor = np.arange(users.size), degrees.copy(), _OVERSAMPLE
    while left.size:
        u = np.repeat(left, need[left] * factor)  # (M,) chunk-local user of each proposal
        i = rng.integers(n_items, size=u.size)
        i = np.where(rng.random(u.size) < prob[i], i, alias_of[i])
        cos = _pair_dot(user_cols, users[u], item_cols, i)
        keep = rng.standard_exponential(u.size) > scale * (1.0 - cos)
        drawn_u, drawn_i = np.concatenate([drawn_u, u[keep]]), np.concatenate([drawn_i, i[keep]])
        _, first = np.unique(drawn_u * n_items + drawn_i, return_index=True)
        have = np.bincount(drawn_u[first], minlength=users.size)
        need = degrees - have
        left, factor = np.flatnonzero(need > 0), factor * 2
    first = np.sort(first)  # distinct pairs in draw order
    u, i = drawn_u[first], drawn_i[first]
    order = np.argsort(u, kind="stable")
    u, i = u[order], i[order]
    counts = np.bincount(u, minlength=users.size)
    rank = np.arange(u.size) - (np.cumsum(counts) - counts)[u]
    keep = rank < degrees[u]
    return users[u[keep]], i[keep]


def _cover_items(users: np.ndarray, items: np.ndarray, lat: Latents, seed: int,
                 n_candidates: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Give every item that no user drew one interaction, with the best-matching of a few random
    users, so that itemIDs run 0..I-1 in the file. Returns the extended (users, items)."""
    n_users, n_items = lat.user_factors.shape[0], lat.item_factors.shape[0]
    missing = np.setdiff1d(np.arange(n_items), items)
    if missing.size == 0:
        return users, items
    cand = _rng(seed, _COVER).integers(n_users, size=(missing.size, n_candidates))
    cos = _pair_dot(lat.user_factors.T, cand.ravel(), lat.item_factors.T, np.repeat(missing, n_candidates))
    best = cand[np.arange(missing.size), cos.reshape(cand.shape).argmax(axis=1)]
    return np.concatenate([users, best]), np.concatenate([items, missing])


def _split(users: np.ndarray, items: np.ndarray, n_users: int,
           seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Give each row a random timestamp, sort by (user, time, item) and label each user's latest
    ~10% test (2), the ~10% before valid (1), the rest train (0); users with < 3 rows keep all in train.
    Returns (users, items, timestamps, labels), all (N,) int64, in file order."""
    stamps = _T0 + _rng(seed, _SPLIT).integers(_T_SPAN, size=users.size)
    order = np.lexsort((items, stamps, users))
    users, items, stamps = users[order], items[order], stamps[order]
    counts = np.bincount(users, minlength=n_users)
    from_end = np.cumsum(counts)[users] - 1 - np.arange(users.size)  # 0 on each user's latest row
    held = np.where(counts >= 3, np.maximum(1, (counts + 5) // 10), 0)[users]  # rows each for valid, test
    labels = np.where(from_end < held, 2, np.where(from_end < 2 * held, 1, 0))
    return users, items, stamps, labels


def _write_inter(path: Path, users: np.ndarray, items: np.ndarray, stamps: np.ndarray,
                 labels: np.ndarray, progress: bool) -> None:
    """Write the tab-separated interaction file, rating always 1.0."""
    rows = np.stack([users, items, stamps, labels], axis=1)  # (N, 4) int64
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.write(INTER_HEADER + "\n")
        for start in progress_bar(range(0, rows.shape[0], _INTER_CHUNK), desc=path.name, unit="chunk",
                                  show=progress):
            f.writelines("%d\t%d\t1.0\t%d\t%d\n" % tuple(r) for r in rows[start:start + _INTER_CHUNK].tolist())


def _write_features(path: Path, lat: Latents, p: SynthPreset, seed: int, modality: int, dim: int,
                    noise: float, progress: bool) -> None:
    """Stream X_m = Q W_m + a N V_m + sigma E_m, shape (I, dim) float32, to a .npy file in chunks of
    rows; each chunk's noise comes from its own generator, so memory stays at one chunk."""
    maps = _rng(seed, _MAPS, modality)
    w = maps.standard_normal((p.n_factors, dim), dtype=np.float32)  # (k, F): factor part has std 1
    v = maps.standard_normal((p.nuisance_dim, dim), dtype=np.float32)
    v *= np.float32(p.nuisance_scale / np.sqrt(p.nuisance_dim))  # (n, F): nuisance part has std a
    factors, nuisance = lat.item_factors, lat.nuisance
    if p.signal == "shared":  # a nuisance of this modality's own
        nuisance = _rng(seed, _OWN_NUISANCE, modality).standard_normal(lat.nuisance.shape)
    elif p.signal == "specific":  # image keeps the first half of the factors, text the second; std stays 1
        half = p.n_factors // 2
        keep = np.arange(p.n_factors) < half if modality == 0 else np.arange(p.n_factors) >= half
        w *= np.where(keep, np.float32(np.sqrt(p.n_factors / keep.sum())), np.float32(0.0))[:, None]
    basis = np.concatenate([w, v])  # (k + n, F)
    coords = np.concatenate([factors, nuisance], axis=1).astype(np.float32)  # (I, k + n)
    rows = max(1, _FEATURE_CHUNK_VALUES // dim)
    header = {"descr": "<f4", "fortran_order": False, "shape": (p.n_items, dim)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        starts = range(0, p.n_items, rows)
        for c, start in enumerate(progress_bar(starts, desc=path.name, unit="chunk", show=progress)):
            x = _rng(seed, _NOISE, modality, c).standard_normal((min(rows, p.n_items - start), dim),
                                                                dtype=np.float32)
            x *= np.float32(noise)
            for j in range(basis.shape[0]):  # elementwise, not BLAS, so bytes match across machines
                x += coords[start:start + x.shape[0], j:j + 1] * basis[j]
            f.write(x.astype("<f4", copy=False).tobytes())
