"""Compute one SGD update (weight decay, momentum, dampening, Nesterov) in a single pass.

The arrays are C-contiguous with one shape and one float dtype; scalars come already
rounded to that dtype, so every product is taken in the arrays' precision, in the order
of `sclref.optim.SGD` (PyTorch's): the result equals the NumPy twin bit for bit.
"""

from sclref.kernels._jit import jit

__all__ = ["sgd_update"]


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
