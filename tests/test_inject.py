"""Starting the backward walk at a hidden layer from an `inject` input (used by the
cosine-similarity-convergence check): each collected layer gets the method's vector."""
import numpy as np
import torch

import dconnx
from helpers import export, rel_err, run


def test_injected_gradient_equals_autograd_vjp():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(6, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5)).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    model = export(net, torch.tensor(x))
    # layer 6 enters the third Conv: inject there, collect at the input and at layer 3
    conv = dconnx.convert(model, methods="gradient,splitgrad", inject=6, collect=["input", "3"]).model
    v = np.random.default_rng(1).standard_normal((2, 8, 4, 4)).astype(np.float32)
    out = run(conv, x, inject=v, alpha=0.5)
    xt = torch.tensor(x, requires_grad=True)
    mid = net[:3](xt)
    mid.retain_grad()
    net[3:6](mid).backward(torch.tensor(v))
    assert rel_err(out["gradient@input"], xt.grad.numpy()) < 1e-5
    assert rel_err(out["gradient@3"], mid.grad.numpy()) < 1e-5
    # SplitGrad's vector δpp + δnn at α = 0.5 is half the gradient: the injection acts as the seed
    assert rel_err(out["splitgrad@3"], 0.5 * mid.grad.numpy()) < 1e-5
