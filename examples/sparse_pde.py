"""Sparse Jacobians of PDE residuals: raijac colours the columns, so a handful of JVPs
recover J however large N is. `raijac compute examples/sparse_pde.py:bratu --out bratu.zarr`.

- `bratu`: the 1-D Bratu residual u'' + lam * exp(u) on N = 8192 points (tridiagonal J,
  3 colours), the pattern given as a scipy.sparse matrix.
- `reaction_diffusion`: a 2-D 5-point Laplacian plus a cubic reaction on a 1000 x 1000
  grid, N = 10^6 unknowns (5 non-zeros per row, 6 colours): dense, J would take 8 TB.
- `reaction_diffusion_detect`: the same on a 200 x 200 grid, the pattern traced by raijac.
"""

import numpy as np
import scipy.sparse as sp
import torch

import raijac


def bratu_residual(u: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Dirichlet ends, interior (u[i-1] - 2 u[i] + u[i+1]) / h^2 + lam * exp(u[i])."""
    h = 1.0 / (u.shape[0] + 1)
    inner = (u[:-2] - 2 * u[1:-1] + u[2:]) / h**2 + lam * torch.exp(u[1:-1])
    return torch.cat([u[:1], inner, u[-1:]])


def tridiagonal(n: int) -> sp.csr_array:
    return sp.diags_array([np.ones(n - 1), np.ones(n), np.ones(n - 1)], offsets=[-1, 0, 1], shape=(n, n)).tocsr()


def bratu(n: int = 8192) -> raijac.Problem:
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    u = 0.1 * torch.sin(torch.pi * x)
    return raijac.Problem(bratu_residual, u, sparsity=tridiagonal(n))


def reaction_diffusion_residual(u: torch.Tensor) -> torch.Tensor:
    """5-point Laplacian with zero (Dirichlet) padding, minus u^3, on an (n, n) grid."""
    p = torch.nn.functional.pad(u, (1, 1, 1, 1))
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * u
    return lap - u**3


def laplacian_pattern(n: int) -> sp.csr_array:
    """Structure of the 5-point stencil on an (n, n) grid, C-order flattening."""
    one_d = sp.diags_array([np.ones(n - 1), np.ones(n), np.ones(n - 1)], offsets=[-1, 0, 1], shape=(n, n))
    eye = sp.identity(n, format="csr")
    return (sp.kron(eye, one_d) + sp.kron(one_d, eye)).tocsr()


def reaction_diffusion(n: int = 1000) -> raijac.Problem:
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, n, dtype=torch.float64, generator=g)
    return raijac.Problem(reaction_diffusion_residual, u, sparsity=laplacian_pattern(n))


def reaction_diffusion_detect(n: int = 200) -> raijac.Problem:
    g = torch.Generator().manual_seed(0)
    u = torch.rand(n, n, dtype=torch.float64, generator=g)
    return raijac.Problem(reaction_diffusion_residual, u, sparsity="detect")


def reaction_diffusion_jacobian(u: torch.Tensor) -> sp.csr_array:
    """The analytic Jacobian: the 5-point Laplacian minus diag(3 u^2)."""
    n = u.shape[0]
    one_d = sp.diags_array([np.ones(n - 1), -2 * np.ones(n), np.ones(n - 1)], offsets=[-1, 0, 1], shape=(n, n))
    eye = sp.identity(n, format="csr")
    lap = sp.kron(eye, one_d) + sp.kron(one_d, eye)
    return (lap - sp.diags_array(3 * u.reshape(-1).numpy() ** 2)).tocsr()
