"""Compute one SGD update (weight decay, momentum, dampening, Nesterov) or one Adam update in a single pass.

The arrays are C-contiguous with one shape and one float dtype; scalars come already
rounded to that dtype, so every product is taken in the arrays' precision, in the order
of `sclref.optim.SGD` and `sclref.optim.Adam` (PyTorch's): the result equals the NumPy
twin bit for bit.
"""

import math

import numpy as np

from sclref.kernels._jit import jit

__all__ = ["adam_update", "sgd_update"]


@jit
def _sgd_update(p, g, buf, lr, momentum, one_minus_dampening, weight_decay, dampened, nesterov, first):
    for i in range(p.size):
        d = g[i]
        if weight_decay != 0:
            d = p[i] * weight_decay + d
        if momentum != 0:
            if first:
                b = d
            elif dampened:
                b = buf[i] * momentum + d * one_minus_dampening
            else:
                b = buf[i] * momentum + d
            buf[i] = b
            d = b * momentum + d if nesterov else b
        p[i] = p[i] - d * lr


def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """Update `p` in place from gradient `g`, and the momentum buffer `buf` when momentum > 0.

    ``d = g + weight_decay * p``; with momentum ``buf = d`` on the `first` step, else
    ``buf = momentum * buf + (1 - dampening) * d``, and ``d = d + momentum * buf``
    (nesterov) or ``d = buf``; then ``p -= lr * d``. `buf` is ignored without momentum.
    O(size), one read of each array and one write of `p` and `buf`.
    """
    t = p.dtype.type
    _sgd_update(p.reshape(-1), g.reshape(-1), buf.reshape(-1), t(lr), t(momentum), t(1.0 - dampening),
                t(weight_decay), dampening != 0, bool(nesterov), bool(first))


@jit
def _adam_update(p, g, m, v, one_minus_beta1, beta1, one_minus_beta2, beta2, bias2_sqrt, eps, step_size):
    for i in range(p.size):
        d = g[i]
        mi = m[i] * beta1 + d * one_minus_beta1
        vi = v[i] * beta2 + d * d * one_minus_beta2
        m[i], v[i] = mi, vi
        p[i] = p[i] - mi / (np.sqrt(vi) / bias2_sqrt + eps) * step_size


def adam_update(p, g, m, v, lr, beta1, beta2, eps, step):
    """Update `p`, the first moment `m` and the second moment `v` in place from gradient `g`.

    ``m = beta1 * m + (1 - beta1) * g``, ``v = beta2 * v + (1 - beta2) * g * g``, then
    ``p -= m / (sqrt(v) / sqrt(1 - beta2^step) + eps) * lr / (1 - beta1^step)``, with the
    bias corrections computed in Python floats. O(size), one read of each array and one
    write of `p`, `m` and `v`.
    """
    t = p.dtype.type
    _adam_update(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), t(1.0 - beta1), t(beta1),
                 t(1.0 - beta2), t(beta2), t(math.sqrt(1.0 - beta2 ** step)), t(eps), t(lr / (1.0 - beta1 ** step)))
