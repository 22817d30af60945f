"""One optimisation step (loss, backward, Adam) on a batch of positive pairs, eager or replayed from a CUDA graph.

On a GPU a step of MSI at Baby scale is about 300 small kernels and mostly waits on their launches (docs/benchmarks.md).
``TrainStep(cuda_graph=True)`` captures the whole step once per batch size and replays it: the model runs in its
static-shape mode (``MSI.static_shapes``: an edge-list graph product, repeated batch items masked instead of
``torch.unique``), Adam runs with ``capturable=True``. The warm-up steps that a capture needs are undone afterwards
(parameters, Adam state and RNG states restored), so the captured run follows the eager one: the same random
draws, the same arithmetic up to summation order. A capture that fails is reported (``capture_error``) and the step
stays eager.

Status: opt-in (``train.cuda_graph: false`` by default). On its one run on a GPU (an NVIDIA H100, torch 2.11) the
captured step failed: the trainer and the benchmark died with a segmentation fault during the first capture, and the
CUDA tests hit an out-of-bounds gather on the first replay, since fixed here (the captured graph read the edge list
after ``static_shapes(False)`` had freed it). The segmentation fault is not understood; the path is unverified.
"""

from __future__ import annotations

import warnings

import torch

from msi.models import MSI, Recommender


class TrainStep:
    """``step(batch)``: one optimisation step on ``batch`` (B, 2) of (user, item) rows; returns the loss terms.

    The returned tensors are detached 0-d tensors on the model's device; with a CUDA graph they are the graph's own
    outputs, overwritten by the next step of the same batch size, so read or copy them before that.
    ``cuda_graph`` is honoured for MSI on a CUDA device and ignored elsewhere (``self.cuda_graph`` says which).
    Build it after the model is on its device and after any optimizer ``load_state_dict`` (the captured graph
    keeps the addresses of the Adam state). ``bf16``: bfloat16 autocast of the forward pass and loss (eager only).
    """

    def __init__(self, model: Recommender, optimizer: torch.optim.Optimizer, cuda_graph: bool = False,
                 warmup: int = 3, bf16: bool = False) -> None:
        self.model, self.optimizer, self.warmup, self.bf16 = model, optimizer, warmup, bf16
        self.cuda_graph = cuda_graph and not bf16 and isinstance(model, MSI) and model.device.type == "cuda"
        self.capture_error: str | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, dict[str, torch.Tensor]]] = {}
        self._grads: dict[int, list[torch.Tensor | None]] = {}
        self._edges: dict[int, object] = {}  # per captured batch size, the EdgeList its graph gathers from
        if self.cuda_graph:
            _make_capturable(optimizer, model.device)

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cuda_graph:
            captured = self._graphs.get(len(batch)) or self._capture(batch)
            if captured is not None:
                graph, static_batch, terms = captured
                static_batch.copy_(batch)
                graph.replay()
                return terms
        return self._eager(batch)

    def _eager(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        return self._body(batch)

    def _body(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        # bf16: autocast of the forward pass and the loss only; backward and the Adam step run outside it
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            terms = self.model.loss(batch[:, 0], batch[:, 1])
        terms["loss"].backward()
        self.optimizer.step()
        return {k: v.detach() for k, v in terms.items()}

    def _capture(self, batch: torch.Tensor):
        """Capture the step for ``len(batch)``; None (and eager from then on) if capture fails."""
        saved = _snapshot(self.model, self.optimizer)
        static_batch = batch.clone()
        try:
            self.model.static_shapes(True)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
                for _ in range(self.warmup):
                    self._eager(static_batch)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # the backward in the graph allocates static gradients
            with torch.cuda.graph(graph):
                terms = self._body(static_batch)
        except Exception as e:  # any failure: report it, undo the warm-up, and go on eagerly
            self.capture_error = f"{type(e).__name__}: {e}"
            self.cuda_graph = False
            warnings.warn(f"CUDA graph capture failed, training eagerly: {self.capture_error}", stacklevel=2)
            torch.cuda.synchronize()
            _restore(self.model, self.optimizer, saved)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        finally:
            edges = self.model.edges  # the graph reads this edge list's memory on every replay: keep it alive
            self.model.static_shapes(False)
        torch.cuda.synchronize()
        _restore(self.model, self.optimizer, saved)
        # the graph's gradients stay referenced here: capturing another batch size re-points p.grad
        self._grads[len(batch)] = [p.grad for p in self.model.parameters()]
        self._edges[len(batch)] = edges
        self._graphs[len(batch)] = (graph, static_batch, terms)
        return self._graphs[len(batch)]


def _make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Switch Adam to ``capturable=True`` (its step counts as device tensors), keeping any state it has."""
    if not isinstance(optimizer, torch.optim.Adam):
        raise TypeError(f"a CUDA-graph step needs torch.optim.Adam, got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        group["capturable"] = True
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].to(device=device, dtype=torch.float32)


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Copies of everything a warm-up step changes: parameters, Adam state (which tensors existed), RNG states."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "optim": {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in optimizer.state.items()},
        "rng": (torch.get_rng_state(), torch.cuda.get_rng_state(model.device) if model.device.type == "cuda" else None),
    }


@torch.no_grad()
def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Put back a ``_snapshot`` in place (the tensors keep their addresses); Adam state that the warm-up created is
    zeroed, which is what a fresh Adam state holds."""
    for p, old in zip(model.parameters(), saved["params"]):
        p.copy_(old)
    for p, state in optimizer.state.items():
        before = saved["optim"].get(p, {})
        for k, v in state.items():
            if torch.is_tensor(v):
                v.copy_(before[k]) if k in before else v.zero_()
    cpu, cuda = saved["rng"]
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, model.device)
