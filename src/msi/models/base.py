"""The interface every model offers to the trainer, the evaluator and notebooks, and LightGCN propagation."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from msi.errors import MSIError, raised, shown


class _BlockSpMM(torch.autograd.Function):
    """A @ X for a sparse A given also A's transpose: the gradient with respect to X is A^T @ G, with no transpose
    to build (torch's own backward transposes A, which for CSR re-sorts it on every step). For a symmetric Â pass
    Â twice; for a block of one, the block and its mirror."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, a_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.a_t = a_t
        return torch.sparse.mm(a, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None, torch.Tensor]:  # type: ignore[override]
        return None, None, torch.sparse.mm(ctx.a_t, grad)


def sparse_product(a: torch.Tensor, a_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A @ X, (N, M) @ (M, k), for a fixed sparse A given with its transpose A^T: the gradient with respect to X is
    A^T @ G, with no transpose built on each backward (a symmetric A is passed twice). Runs in float32 outside
    autocast, as every sparse product here does (torch has no bfloat16 sparse product on the CPU)."""
    with torch.autocast(x.device.type, enabled=False):
        return _BlockSpMM.apply(a, a_t, x.to(torch.float32))


def pair_keys(train: np.ndarray | torch.Tensor, n_items: int) -> torch.Tensor:
    """The sorted unique keys user * n_items + item of the (n, 2) train pairs: what ``sample_negatives`` rejects."""
    train = torch.as_tensor(np.asarray(train), dtype=torch.long).reshape(-1, 2)
    return torch.unique(train[:, 0] * n_items + train[:, 1])


def sample_negatives(keys: torch.Tensor, users: torch.Tensor, n_items: int) -> torch.Tensor:
    """One uniformly drawn item per user (B,), redrawn while (user, item) is among ``keys`` (``pair_keys``)."""
    neg = torch.randint(0, n_items, users.shape, device=users.device)
    while True:
        k = users * n_items + neg
        pos = torch.searchsorted(keys, k).clamp(max=len(keys) - 1)
        todo = keys[pos] == k
        if not bool(todo.any()):
            return neg
        neg = torch.where(todo, torch.randint(0, n_items, users.shape, device=users.device), neg)


def bipartite_blocks(adj: torch.Tensor, n_users: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The two off-diagonal blocks (Â_UI (U, I), Â_IU (I, U)) of a CSR Â over users 0..U-1 then items, as CSR
    tensors, or None when Â is not bipartite (a user-user or item-item entry) or not CSR. Row u of Â_UI holds the
    non-zeros of row u of Â in the same order."""
    if adj.layout != torch.sparse_csr:
        return None
    crow, col, val = adj.crow_indices(), adj.col_indices(), adj.values()
    n = adj.shape[0]
    split = int(crow[n_users])
    if bool((col[:split] < n_users).any()) or bool((col[split:] >= n_users).any()):
        return None
    n_items = n - n_users
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        ui = torch.sparse_csr_tensor(crow[: n_users + 1], col[:split] - n_users, val[:split], (n_users, n_items),
                                     check_invariants=False)
        iu = torch.sparse_csr_tensor(crow[n_users:] - split, col[split:], val[split:], (n_items, n_users),
                                     check_invariants=False)
    return ui, iu


def one_layer_readout(
    blocks: tuple[torch.Tensor, torch.Tensor], users: torch.Tensor, items: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``lightgcn_readout`` with one layer on a bipartite Â, for graphs that share the user rows ``users`` (U, d)
    and differ in their item rows ``items`` [(I, d), ...]: returns the readout's user rows of the first graph and
    the item rows of every graph.

    With one layer the item rows of Â Z_0 are Â_IU @ users in every graph, so they are computed once, and only the
    first graph's user rows, Â_UI @ items[0], are computed at all: a U x d and an I x d product where the stacked
    form does an N x gd one. Each output row sums the same terms in the same order as ``lightgcn_readout``, so the
    values agree to float rounding (bit for bit at d = 64 on our CPU; torch's CSR kernel may round products of
    different widths differently); the gradient of the shared users sums the graphs before the product, not after.
    """
    ui, iu = blocks
    shared = sparse_product(iu, ui, users)  # (I, d)
    first = sparse_product(ui, iu, items[0])  # (U, d)
    return (users + first) / 2, [(x + shared) / 2 for x in items]


def lightgcn_readout(adj: torch.Tensor, x0: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Mean of Z_0..Z_L with Z_{l+1} = Â Z_l: (N, N) symmetric sparse Â, (N, k) dense Z_0 -> (N, k).

    Several graphs that share Â go through in one call by stacking their node matrices along the columns.
    The product runs in Â's dtype (float32) outside autocast: torch has no bfloat16 sparse product on the CPU.
    """
    out, z = x0, x0
    for _ in range(n_layers):
        z = sparse_product(adj, adj, z)
        out = out + z
    return out / (n_layers + 1)


def mask_rows(scores: torch.Tensor, users: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Set scores[b, i] = -inf where ``exclude`` (a (U, I) sparse CSR 0/1 matrix) holds (users[b], i).

    scores: (B, I), users: (B,) long, both on ``exclude``'s device. Modifies and returns ``scores``.
    """
    crow, col = exclude.crow_indices(), exclude.col_indices()
    start, end = crow[users], crow[users + 1]
    counts = end - start
    rows = torch.repeat_interleave(torch.arange(len(users), device=scores.device), counts)
    first = torch.repeat_interleave(start - (torch.cumsum(counts, 0) - counts), counts)
    cols = col[first + torch.arange(len(rows), device=scores.device)]
    scores[rows, cols] = float("-inf")
    return scores


class Recommender(nn.Module):
    """What every model provides: ``embeddings()``, ``loss(users, items)``, ``score`` and ``recommend``.

    Subclasses implement ``embeddings()`` -> {"user": (U, d), "id": (I, d), <modality>: (I, d), ...}, the final
    representations whose inner products are the scores, and ``loss``. In eval mode everything is deterministic.
    docs/adding_a_model.md describes the whole interface.

    Class attributes a model sets: ``item_views``, the keys of ``embeddings()`` that can represent items;
    ``param_groups``, the first dotted part of a parameter's name -> the group whose gradient norm the trainer
    logs as ``grad_<group>`` (``grad_norms``; parameters of no group are "other").
    """

    item_views: tuple[str, ...] = ("id",)
    param_groups: dict[str, str] = {}

    def __init__(self) -> None:
        super().__init__()
        # (U, I) sparse CSR 0/1 of each user's train items, set by build_model (and so open_run): what
        # ``recommend`` leaves out by default. A model constructed directly has none and leaves out nothing.
        self.register_buffer("seen", None, persistent=False)

    @property
    def device(self) -> torch.device:
        """The device of the model's tensors (parameters, or buffers for models with none)."""
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    def embeddings(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Called by the trainer before epoch ``epoch`` (0-based): for schedules such as MSI's beta warm-up."""

    def code_stats(self) -> dict[str, float]:
        """Statistics of the model's item codes that the trainer logs each epoch (MSI: SSD scales and cosines)."""
        return {}

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sample_negatives(self, users: torch.Tensor) -> torch.Tensor:
        """One uniformly drawn item per user (B,), redrawn while it is one of the user's train items: for a model
        that keeps its train pairs as the buffer ``train_keys`` (``pair_keys``) and its size as ``n_items``."""
        return sample_negatives(self.train_keys, users, self.n_items)

    @torch.no_grad()
    def score(
        self, users: torch.Tensor, item_view: str = "id", emb: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Scores (B, I) of ``users`` (B,) against every item, items represented by ``item_view``.

        ``emb`` lets a caller compute ``embeddings()`` once and score many user batches with it.
        """
        if item_view not in self.item_views:
            raise ValueError(f"unknown item view {item_view!r}; this model has {', '.join(self.item_views)}")
        emb = self.embeddings() if emb is None else emb
        return emb["user"][users] @ emb[item_view].T

    @torch.no_grad()
    def recommend(
        self,
        users: torch.Tensor,
        k: int,
        exclude: torch.Tensor | None = None,
        item_view: str = "id",
        emb: dict[str, torch.Tensor] | None = None,
        *,
        exclude_seen: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores, items), each (B, k), for ``users`` (B,), best first.

        Each user's train items (``seen``) are left out unless ``exclude_seen=False``; ``exclude``, a (U, I) sparse
        CSR mask, is left out instead of them (msi-recommend's train and valid items). A left-out item gets the
        score -inf, so a user with fewer than k candidates has -inf at the end of the row.
        """
        scores = self.score(users, item_view, emb)
        mask = exclude if exclude is not None else self.seen if exclude_seen else None
        if mask is not None:
            mask_rows(scores, users, mask)
        return torch.topk(scores, min(k, scores.shape[1]), dim=1)


@torch.no_grad()
def grad_norms(model: Recommender) -> dict[str, float]:
    """The L2 norm of the current gradient of each parameter group (``grad_<group>``), groups without one left out.

    A parameter's group is ``model.param_groups[<the first dotted part of its name>]``, else "other"."""
    sq: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            group = model.param_groups.get(name.split(".")[0], "other")
            sq[group] = sq.get(group, 0.0) + p.grad.float().pow(2).sum()
    return {f"grad_{g}": float(v) ** 0.5 for g, v in sq.items()}


def check_contract(model: Recommender, pairs: torch.Tensor, n_users: int, n_items: int, name: str) -> None:
    """Before a run starts: one ``loss`` on a batch of train ``pairs`` (B, 2) and one ``embeddings()``, in train mode
    as the trainer calls them (no backward), checked against the interface (a dict of scalar terms holding ``loss``;
    ``user`` (U, d) and each of ``item_views`` (I, d)). Whatever fails, or raises, is one MSIError naming the model
    and its class. The random state is left as it was: the run draws the same numbers as without the check."""
    where = f"model {name!r} ({type(model).__module__}.{type(model).__qualname__})"
    devices = [pairs.device] if pairs.device.type == "cuda" else []
    trainable = any(p.requires_grad for p in model.parameters())  # none (popularity): the trainer never calls loss
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            # as the trainer calls it; no backward, so no gradient
            terms = model.loss(pairs[:, 0], pairs[:, 1]) if trainable else {"loss": torch.zeros(())}
            emb = model.embeddings()
    except (MSIError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # a plugin's own bug: one line, not its traceback
        raise MSIError(f"{where}: a forward pass on one batch raised {raised(e)}") from None
    problem = _terms_problem(terms) or _embeddings_problem(emb, model.item_views, n_users, n_items)
    if problem:
        raise MSIError(f"{where}: {problem} (docs/adding_a_model.md gives the interface)")


def _terms_problem(terms: object) -> str | None:
    if not isinstance(terms, dict) or "loss" not in terms:
        got = sorted(map(str, terms)) if isinstance(terms, dict) else type(terms).__name__
        return f"loss() must return a dict holding 'loss', got {shown(got)}"
    for key, value in terms.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"loss() term {shown(key)} must be a scalar tensor, got {shape}"
    return None


def _embeddings_problem(emb: object, views: tuple[str, ...], n_users: int, n_items: int) -> str | None:
    if not isinstance(emb, dict) or "user" not in emb:
        return "embeddings() must return a dict holding 'user' and the item_views"
    want = {"user": n_users, **{v: n_items for v in views}}
    width = emb["user"].shape[-1] if isinstance(emb["user"], torch.Tensor) else None
    for key, rows in want.items():
        got = emb.get(key)
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (rows, width):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return f"embeddings()[{key!r}] must be ({rows}, d) with one d for all, got {shape}"
    return None

