"""sclref: a NumPy reference engine for Sparse Connectivity Learning.

The engine: `Tensor` with reverse-mode autograd (`sclref.autograd`), differentiable ops
(`sclref.ops`), layers (`sclref.nn`), optimizers (`sclref.optim`) and a gradient checker
(`sclref.testing`).
"""

from sclref import models, nn, ops, optim, rng, testing
from sclref._version import __version__
from sclref.autograd import Function, Tensor, is_grad_enabled, no_grad, tensor
from sclref.rng import manual_seed

__all__ = ["Function", "Tensor", "__version__", "is_grad_enabled", "manual_seed", "models", "nn", "no_grad", "ops",
           "optim", "rng", "tensor", "testing"]
