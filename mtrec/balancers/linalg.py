"""Small T x T linear algebra that never waits for the host.

``torch.linalg.solve`` / ``eigh`` / ``pinv`` check their LAPACK status on CUDA, which synchronises
the device with the CPU every step. Balancers use ``solve_ex`` (no status check) with a ridge
that keeps the systems non-singular, and, off the CPU, a fixed number of Jacobi sweeps for the
symmetric eigen-decomposition.
"""

from __future__ import annotations

import torch
from torch import Tensor


def solve(A: Tensor, B: Tensor) -> Tensor:
    """``A X = B`` without a status check (the caller keeps ``A`` non-singular with a ridge)."""
    return torch.linalg.solve_ex(A, B)[0]


def _round_robin(n: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint index pairs covering every pair once (the circle method)."""
    m = n + (n % 2)
    players = list(range(m))
    rounds = []
    for _ in range(m - 1):
        pairs = [(players[i], players[m - 1 - i]) for i in range(m // 2)]
        rounds.append([(min(p, q), max(p, q)) for p, q in pairs if max(p, q) < n])
        players = [players[0], players[-1], *players[1:-1]]
    return rounds


def jacobi_eigh(A: Tensor, sweeps: int = 10) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric ``[n, n]`` matrix.

    Parallel cyclic Jacobi: each round rotates n/2 disjoint (p, q) planes at once, zeroing
    A[p, q]; a sweep covers every pair. Convergence is quadratic, so 10 sweeps reach working
    precision for the n <= ~20 of multi-task learning (checked against ``torch.linalg.eigh``).
    """
    n = A.shape[-1]
    A = A.clone()
    V = torch.eye(n, dtype=A.dtype, device=A.device)
    plans = []
    for pairs in _round_robin(n):
        if pairs:
            p = torch.tensor([a for a, _ in pairs], device=A.device)
            q = torch.tensor([b for _, b in pairs], device=A.device)
            plans.append((p, q))
    for _ in range(sweeps):
        for p, q in plans:
            app, aqq, apq = A[p, p], A[q, q], A[p, q]
            theta = 0.5 * torch.atan2(2 * apq, app - aqq)
            c, s = torch.cos(theta), torch.sin(theta)
            J = torch.eye(n, dtype=A.dtype, device=A.device)
            J[p, p] = c
            J[q, q] = c
            J[p, q] = -s
            J[q, p] = s
            A = J.T @ A @ J
            V = V @ J
    values = torch.diagonal(A)
    order = torch.argsort(values)
    return values[order], V[:, order]


def symmetric_eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` on the CPU (no device to wait for), Jacobi sweeps elsewhere."""
    if A.device.type == "cpu":
        return torch.linalg.eigh(A)
    return jacobi_eigh(A)
