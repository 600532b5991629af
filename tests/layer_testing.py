"""Synthetic layers shared by tests/test_gptq.py and tests/test_pruning.py: correlated activations, their Hessian,
and small weights. A plain module (not collected), imported like checker_testing."""

import pytest
import torch


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_inputs(tokens: int, in_f: int, seed: int = 0, dead=None) -> torch.Tensor:
    """(tokens, in_f) activations: mixed (correlated) columns, a strongly shared component, uneven column scales."""
    g = gen(seed)
    base = torch.randn(tokens, in_f, generator=g)
    X = base + base @ (torch.randn(in_f, in_f, generator=g) * 0.5)
    X[:, : in_f // 4] += 3 * base[:, [0]]  # a block of columns that move together
    X = X * torch.linspace(0.2, 4.0, in_f)[torch.randperm(in_f, generator=g)]
    if dead is not None:
        X[:, dead] = 0
    return X


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    return 2 / X.shape[0] * X.t() @ X


def make_weight(out_f: int, in_f: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=gen(seed)) * 0.05


@pytest.fixture(scope="module")
def layer():
    """W (48, 128), inputs X (512, 128) and H = 2/N X^T X."""
    X = make_inputs(512, 128)
    return make_weight(48, 128), X, hessian_of(X)
