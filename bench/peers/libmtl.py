"""One combine step of gradient balancers: mtrec vs LibMTL 1.1.5, same per-task gradients.

LibMTL's package import pulls in torchvision (its architectures), which does not install beside
the CPU torch, so its ``weighting`` modules are loaded from their files under a stub ``LibMTL``
package (they import only torch, numpy, scipy). Their own ``backward`` runs unchanged on a fake
model: its shared parameters have the shapes below, and ``_compute_grad`` (which would run one
backward per task and copy each task's gradient into a ``[T, D]`` matrix) is replaced by
returning that matrix already built, so LibMTL is timed on its weighting + write-back only (the
gradient extraction it would also pay is not counted: this favours LibMTL). mtrec is timed on
``build(name, T).combine(grads)`` with ``grads[k]`` of shape ``[T, *shape_k]``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import torch

from mtrec import balancers
from mtrec.balancers import projection

from .common import adaptive_reps, header, table

# Shared tensors of an MMoE (4 experts: [in, 256] + [256, 128], stacked) and embedding rows.
SHAPES = {
    "0.5M": [(4, 352, 256), (4, 256), (4, 256, 128), (4, 128)],
    "5M": [(16384, 16), (4, 4480, 256), (4, 256), (4, 256, 128), (4, 128)],
}
METHODS = ["pcgrad", "cagrad", "mgda", "imtl", "aligned-mtl"]
LIBMTL_NAME = {"pcgrad": "PCGrad", "cagrad": "CAGrad", "mgda": "MGDA", "imtl": "IMTL"}
LIBMTL_KWARGS = {"cagrad": {"calpha": 0.5, "rescale": 1}, "mgda": {"mgda_gn": "none"}}


def load_libmtl_weighting(name: str):
    """The LibMTL weighting class ``name`` loaded from its file (no ``import LibMTL``)."""
    if "LibMTL.weighting" not in sys.modules:
        spec = importlib.util.find_spec("LibMTL")  # locates the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("LibMTL is not installed (pip install --no-deps LibMTL==1.1.5)")
        root = Path(list(spec.submodule_search_locations)[0])
        for pkg, path in (("LibMTL", root), ("LibMTL.weighting", root / "weighting")):
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(path)]
            sys.modules[pkg] = mod
    return getattr(importlib.import_module(f"LibMTL.weighting.{name}"), name)


def libmtl_version() -> str:
    from importlib.metadata import version

    return version("LibMTL")


def make_grads(shapes, T: int, seed: int) -> list[torch.Tensor]:
    """Per-task gradients with a shared direction, task-specific noise, conflicts and unequal norms."""
    gen = torch.Generator().manual_seed(seed)
    along = torch.tensor([1.0, 0.6, -0.4, 0.8, 0.3, -0.6, 0.5, 0.2][:T])
    scale = torch.tensor([1.0, 0.3, 2.0, 0.7, 1.5, 0.5, 1.2, 0.9][:T])
    out = []
    for shape in shapes:
        n = math.prod(shape)
        base = torch.randn(n, generator=gen)
        noise = torch.randn(T, n, generator=gen)
        g = (along[:, None] * base[None, :] + 0.8 * noise) * scale[:, None] * 1e-3
        out.append(g.reshape(T, *shape).contiguous())
    return out


class LibMTLDriver:
    """A LibMTL weighting on a fake model whose shared parameters hold the given gradients."""

    def __init__(self, method: str, grads: list[torch.Tensor]):
        cls = load_libmtl_weighting(LIBMTL_NAME[method])
        T = grads[0].shape[0]
        flat = torch.cat([g.reshape(T, -1) for g in grads], 1).contiguous()
        params = [torch.nn.Parameter(torch.zeros(g.shape[1:])) for g in grads]
        for p in params:
            p.grad = torch.zeros_like(p)

        class Fake(cls):
            def __init__(self):
                super().__init__()
                self.task_num, self.device, self.rep_grad = T, torch.device("cpu"), False
                self.task_name = [f"t{i}" for i in range(T)]
                self._params = params

            def get_share_params(self):
                return self._params

            def zero_grad_share_params(self):
                for p in self._params:
                    p.grad.zero_()

            def _compute_grad(self, losses, mode, rep_grad=False):
                return flat  # the [T, D] matrix LibMTL would build with T backwards

        self.model = Fake()
        self.model.init_param()
        self.kwargs = LIBMTL_KWARGS.get(method, {})
        self.losses = torch.ones(T)
        self.params = params

    def step(self) -> list[torch.Tensor]:
        self.model.backward(self.losses, **self.kwargs)
        return [p.grad for p in self.params]


def identity_orders(num_tasks: int, include_self: bool, device) -> torch.Tensor:
    """Every task visits the others in index order (to compare PCGrad deterministically)."""
    steps = num_tasks if include_self else num_tasks - 1
    visit = torch.arange(steps)[:, None, None] == torch.arange(num_tasks)[None, None, :]
    return visit.expand(steps, num_tasks, num_tasks)


class _InOrder:
    @staticmethod
    def shuffle(x):
        return None


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    x = torch.cat([t.reshape(-1) for t in a]).double()
    y = torch.cat([t.reshape(-1) for t in b]).double()
    cos = float(x @ y / (x.norm() * y.norm()).clamp_min(1e-300))
    rel = float((x - y).norm() / y.norm().clamp_min(1e-300))
    return cos, rel


def run(quick: bool) -> None:
    header("balancer combine step: mtrec vs LibMTL")
    print(f"LibMTL {libmtl_version()} (weighting modules loaded from their files)")
    sizes = ["0.5M"] if quick else ["0.5M", "5M"]
    tasks = [3] if quick else [3, 6]
    budget = 1.5 if quick else 4.0
    rows = []
    for size in sizes:
        for T in tasks:
            grads = make_grads(SHAPES[size], T, seed=T)
            n = sum(math.prod(s) for s in SHAPES[size])
            for method in METHODS:
                # IMTL's default is the hybrid, which needs the losses; with its loss scales at their
                # start (s = 0) one step is IMTL-G, which is what LibMTL's first step computes too.
                bal = balancers.build(method, num_tasks=T, **({"variant": "gradient"} if method == "imtl" else {}))
                with torch.no_grad():
                    t_ours, reps_ours = adaptive_reps(lambda: bal.combine(grads), budget, 10, 200)
                ours = bal.combine(grads)
                row = [f"{n / 1e6:.2f}M", T, method, t_ours * 1e3, reps_ours]
                if method not in LIBMTL_NAME:
                    rows.append(row + ["not in LibMTL 1.1.5", "", "", "", ""])
                    continue
                try:
                    driver = LibMTLDriver(method, grads)
                    t_lib, reps_lib = adaptive_reps(driver.step, budget, 3, 100)
                except Exception as err:  # noqa: BLE001 - reported in the table
                    rows.append(row + [f"fails: {type(err).__name__}: {str(err)[:60]}", "", "", "", ""])
                    continue
                if method == "pcgrad":  # same (index) order on both sides: the outputs must agree
                    mod = sys.modules["LibMTL.weighting.PCGrad"]
                    saved_random, saved_orders = mod.random, projection.random_orders
                    mod.random, projection.random_orders = _InOrder, identity_orders
                    try:
                        cos, rel = agreement(bal.combine(grads), driver.step())
                    finally:
                        mod.random, projection.random_orders = saved_random, saved_orders
                    note = "same task order"
                else:
                    cos, rel = agreement(ours, driver.step())
                    note = ""
                rows.append(row + [t_lib * 1e3, reps_lib, t_lib / t_ours, cos, f"{rel:.1e} {note}".strip()])
    print(table(["shared params", "T", "method", "mtrec ms", "reps", "LibMTL ms", "reps", "speed-up",
                 "cosine", "rel. error"], rows))
    print("ms = median wall time of one combine step; speed-up = LibMTL / mtrec, same run.")
    if not quick:
        # PCGrad with the real random orders: how far two draws of the order are apart.
        grads = make_grads(SHAPES["0.5M"], 6, seed=6)
        bal = balancers.build("pcgrad", num_tasks=6)
        cos, rel = agreement(bal.combine(grads), LibMTLDriver("pcgrad", grads).step())
        print(f"pcgrad, T=6, random orders on both sides: cosine {cos:.4f}, rel. error {rel:.2e}")
