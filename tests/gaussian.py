"""Closed-form noise predictors for data whose distribution is known (see reference/ddim.md).

For Gaussian data N(mu, diag(s^2)) the optimal predictor E[eps | x_t] is exact; for a mixture each
component's term is weighted by its posterior responsibility. With these, "is DDIM right?" becomes
a question about numbers.
"""

from __future__ import annotations

import math

import torch


class GaussianEps:
    def __init__(self, alphas_cumprod: torch.Tensor, mu: torch.Tensor, s: torch.Tensor):
        self.abar, self.mu, self.s = alphas_cumprod, mu, s
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert (t == t[0]).all()
        self.calls.append(int(t[0]))
        a = self.abar[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return torch.sqrt(1 - a) * (x - torch.sqrt(a) * self.mu) / (a * self.s**2 + 1 - a)


class MixtureEps:
    """1-D (per coordinate) mixture of Gaussians with weights w, means m, std devs s."""

    def __init__(self, alphas_cumprod: torch.Tensor, w, m, s):
        self.abar = alphas_cumprod
        self.w, self.m, self.s = (torch.tensor(v, dtype=torch.float64) for v in (w, m, s))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar[t].view(-1, *([1] * (x.dim() - 1))).to(torch.float64)
        xd = x.to(torch.float64).unsqueeze(-1)
        a = a.unsqueeze(-1)
        var = a * self.s**2 + 1 - a  # marginal variance of each component at t
        mean = torch.sqrt(a) * self.m
        log_resp = torch.log(self.w) - 0.5 * torch.log(2 * math.pi * var) - (xd - mean) ** 2 / (2 * var)
        resp = torch.softmax(log_resp, dim=-1)
        eps_k = torch.sqrt(1 - a) * (xd - mean) / var
        return (resp * eps_k).sum(-1).to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        return self.m[k] + self.s[k] * torch.randn(n, generator=generator, dtype=torch.float64)
