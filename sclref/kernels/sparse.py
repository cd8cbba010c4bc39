"""Compute the layers of an exported sparse network: chains of CSR layers, direct sparse convolution and pooling.

A weight matrix W of shape (F, K) is held in canonical CSR: ``indptr`` (F+1,),
``indices`` (nnz,) sorted and unique within each row, ``data`` (nnz,). Every output
element is a sum over the kept connections of its row taken in index order, then the
bias is added, whatever the batch size, tiling or thread count: results are
bit-identical from run to run and equal for a sample alone or inside a batch.

A chain is a run of linear layers, each followed by an optional activation, executed
by one `csr_chain` call: a Python call and its argument checks cost about as much as a
whole sparse layer at batch 1, so the layers travel packed (`pack_chain`) and are
validated once.

Convolutions run on NCHW (`csr_conv2d`) or on CHWN activations, batch innermost
(`csr_conv2d_chwn`, `maxpool_chwn`): there, at stride 1, every kept weight and output
row is one multiply-add over a contiguous vector of OW x N lanes, however narrow the
output (LeNet-5's conv2 has OW = 8; a strided one takes N lanes per output column),
the layout of the fast sparse CPU kernels (Park et al.'s direct sparse convolution,
XNNPACK's SpMM over CHW). A CHWN activation read as (C*H*W, N) is the feature-major
layout a chain's batch tiles use inside, so a chain takes it as it is
(``feature_major``). Every kernel's NumPy twin is in `sclref.kernels.reference`.

Threads: a CHWN convolution of at least `SPLIT_MIN_WORK` multiply-adds splits its
output rows into tasks for `sclref.kernels.tasks.run_tasks`, where the calling thread
takes its share and a thread that a busy core starts late finds the tasks taken, so a
call never waits for a worker that has not begun (numba's parallel loops, which the
kernels used before, wait for their slowest thread: beside two busy processes a
parallel LeNet-300-100 chain at batch 64-256 took 24-36 ms against 0.1-0.6 ms serial).
Every other call runs on the caller's thread alone: waking a thread costs 30-180 µs on
the 2-core machine these were measured on, more than the chains and the NCHW
convolutions (small batches) gain from a second core (`benchmarks/sparse_inference.py
--parts threads`: LeNet-300-100-shaped chains of 1-7 M multiply-adds at batch 256-1024,
split into batch tiles, took 1.2-2.1x their serial time on the quiet machine). Tasks
split the outputs, never a sum, so every output has the same bits at any thread count.
"""

import functools
import sys

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from sclref.kernels import tasks
from sclref.kernels._jit import JIT_DISABLED, jit

__all__ = ["ACTIVATIONS", "CHAIN_COLUMNS", "SPLIT_MIN_WORK", "TILE_BYTES", "TILE_MIN", "aligned_empty", "chain_kernel",
           "chain_scratch", "csr_chain", "csr_conv2d", "csr_conv2d_chwn", "maxpool_chwn", "maxpool_nchw", "pack_chain",
           "split_threads"]

# The widest batch tile of `csr_chain`, in bytes of lanes (64 float32 or 32 float64
# samples), and the most lanes one `_dot_lanes` call sums. A tile runs feature-major,
# (features, lanes): each output row's partial sums stay in eight vector registers
# while its kept connections stream past (a wider scratch is summed in such groups),
# and the tile's rows of LeNet-300-100's input (784 features x 256 bytes) stay in L2.
# Against 1 KiB tiles whose sums were loaded and stored every eight connections,
# LeNet-300-100 ran 1.24x faster at batch 256, 1.4x at 64 and 2.8x at 8 (same sums in
# the same order, same bits). Narrower lane groups (16 or 32 lanes, with two or four
# rows summed side by side so that enough additions are in flight) and summing the
# first layer column by column measured 1.2-1.6x slower.
TILE_BYTES = 256

# Batches narrower than this run sample by sample (slices of gathered dot products): no
# transposes, and the only scratch is two feature vectors, which the kernel allocates.
# LeNet-300-100's and LeNet-5's fully connected chains took 0.5 and 0.85 the time of a
# tile at batch 1 and 2, 1.15 at batch 3.
TILE_MIN = 3

# From this many multiply-adds (output pixels x max(nnz, filters)) a CHWN convolution
# splits its output rows over threads (`split_threads`). Measured on 2 cores, whole
# networks, medians against the same run with no split (alternating, 10 ms of warm-up
# calls before each block), quiet and beside two busy processes:
#   threshold   92 %-sparse ResNet-20, batch 64   98.6 %-sparse LeNet-5, batch 256
#   8 M         1.17x quiet, 1.08x load          1.17x, 1.24x
#   0 (all)     1.28-1.38x, 0.76-0.94x           1.35x, 1.35x
# Below 8 M (ResNet-20's first and last-stage convolutions, LeNet-5's at batch 64: 3-8 M,
# calls under a millisecond) the pool thread's wake-up, and under load its preemption in
# the middle of a task, which the caller then waits for, cost what the split gains.
SPLIT_MIN_WORK = 8_000_000

# Activation codes in the "act" column of a chain's layer table.
ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2}

# Columns of a chain's int64 layer table, one row per layer: output and input features,
# nnz; offsets into `ints` of its row pointer, its column indices and the first column
# of each block of BLOCK_BYTES // itemsize input columns some connection reads
# ("blocks", "nblocks" of them); offsets into `vals` of its weights, bias and
# activation slope; the activation code; then the layer as slices for the
# sample-by-sample path (see `pack_chain`): offsets into `ints` of the slices' column
# indices ("slots") and of their rows' lengths and output slots ("order"), into `vals`
# of their weights and biases.
CHAIN_COLUMNS = ("features", "inputs", "nnz", "indptr", "indices", "blocks", "nblocks", "data", "bias", "alpha",
                 "act", "slots", "order", "slot_data", "slot_bias")
(_F, _K, _NNZ, _PTR, _IDX, _BLK, _NBLK, _W, _B, _ALPHA, _ACT, _SLOTS, _ORDER, _SLOT_W,
 _SLOT_B) = range(len(CHAIN_COLUMNS))

# A batch tile enters feature-major in square blocks of one SIMD register's width
# (8 float32 or 4 float64): a block is loaded row by row into registers, transposed
# there with shuffles and stored column by column (2.3x faster than an element-wise
# copy of LeNet-300-100's input).
BLOCK_BYTES = 32


def pack_chain(weights, biases, activations, alphas, dtype):
    """Pack the layers of a chain into the three arrays `csr_chain` reads: (layers, ints, vals).

    weights: canonical scipy CSR matrices (F_l, K_l) with K_{l+1} == F_l; biases (F_l,);
    activations: per layer None, "relu" or "leaky_relu"; alphas: the leaky slopes (or None).
    ``ints`` holds every row pointer and index array (uint32 unless some layer needs 64 bits),
    ``vals`` every weight, bias and slope in `dtype`; ``layers`` (L, len(CHAIN_COLUMNS))
    int64 gives their offsets (see CHAIN_COLUMNS).

    Each layer is also packed as slices for the sample-by-sample path (sliced ELLPACK):
    its rows, longest first, in slices of one SIMD width (8 float32 or 4 float64), a
    slice's t-th connections side by side (``slots``, ``slot_data``; a row shorter than
    its slice's first is padded, and the kernel masks the padding). Its ``order`` is the
    rows' lengths in slice order, then the row each lane of a slice holds
    (``slot_bias`` is in slice order too). A hidden layer's outputs stay in slice order,
    which the next layer's slot indices point into; the last layer's go to their rows. A
    row's connections keep their order, so every sum is the same as the CSR path's.
    """
    dtype = np.dtype(dtype)
    for i in range(1, len(weights)):
        if weights[i].shape[1] != weights[i - 1].shape[0]:
            raise ValueError(f"chain layer {i} has {weights[i].shape[1]} inputs, layer {i - 1} has "
                             f"{weights[i - 1].shape[0]} outputs")
    # Unsigned: numba indexes with a signed integer through a negative-index check
    # (a compare and a conditional move per access), which doubled the time of the
    # dot-product loop.
    wide = any(w.indices.dtype == np.int64 or w.indptr.dtype == np.int64 for w in weights)
    itype = np.uint64 if wide else np.uint32
    layers = np.zeros((len(weights), len(CHAIN_COLUMNS)), np.int64)
    ints, vals = [], [np.zeros(1, dtype)]  # vals[0]: the slope of layers without one
    ni, nv = 0, 1

    def put(parts, arr, offset):
        parts.append(arr)
        return offset + arr.size

    step = BLOCK_BYTES // dtype.itemsize
    place = None  # where the previous layer's outputs sit in the sample-by-sample path
    for i, (w, b, act, alpha) in enumerate(zip(weights, biases, activations, alphas)):
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}")
        f, k = w.shape
        blocks = (np.unique(w.indices // step) * step).astype(itype)
        bias = np.asarray(b).astype(dtype)
        slots, order, slot_data, slot_bias, place = _slices(w, bias, place, step)
        row = layers[i]
        row[[_F, _K, _NNZ, _NBLK, _ACT]] = f, k, w.nnz, blocks.size, ACTIVATIONS[act]
        row[_PTR], ni = ni, put(ints, w.indptr.astype(itype), ni)
        row[_IDX], ni = ni, put(ints, w.indices.astype(itype), ni)
        row[_BLK], ni = ni, put(ints, blocks, ni)
        row[_SLOTS], ni = ni, put(ints, slots.astype(itype), ni)
        row[_ORDER], ni = ni, put(ints, order.astype(itype), ni)
        row[_W], nv = nv, put(vals, w.data.astype(dtype), nv)
        row[_B], nv = nv, put(vals, bias, nv)
        row[_SLOT_W], nv = nv, put(vals, slot_data, nv)
        row[_SLOT_B], nv = nv, put(vals, slot_bias, nv)
        if act == "leaky_relu":
            row[_ALPHA], nv = nv, put(vals, np.asarray([alpha], dtype), nv)
    return layers, np.concatenate(ints or [np.zeros(0, itype)]).astype(itype), np.concatenate(vals)


def _slices(w, b, place, step):
    # `pack_chain`'s sliced layout of CSR `w` (F, K) with bias `b` (weights and bias in b's
    # dtype), its inputs at positions `place` (None: in order): (slots, order, slot_data,
    # slot_bias, where its outputs sit).
    f = w.shape[0]
    padded = f + -f % step
    lengths = np.diff(w.indptr)
    rows = np.argsort(-lengths, kind="stable")  # longest first: a slice's rows need about as many steps
    position = np.empty(f, np.int64)
    position[rows] = np.arange(f)
    sorted_lengths = np.zeros(padded, np.int64)
    sorted_lengths[:f] = lengths[rows]
    steps = sorted_lengths[::step]
    start = np.concatenate([[0], np.cumsum(steps * step)])
    # Connection p of row r, t-th in its row, goes to slice position(r) // step, step t,
    # lane position(r) % step.
    owner = np.repeat(np.arange(f), lengths)
    t = np.arange(w.nnz) - np.repeat(w.indptr[:-1], lengths)
    at = start[position[owner] // step] + t * step + position[owner] % step
    slots, slot_data = np.zeros(start[-1], np.int64), np.zeros(start[-1], b.dtype)
    slots[at] = w.indices if place is None else place[w.indices]
    slot_data[at] = w.data
    slot_bias = np.zeros(padded, b.dtype)
    slot_bias[:f] = b[rows]
    destination = np.zeros(padded, np.int64)
    destination[:f] = rows
    return slots, np.concatenate([sorted_lengths, destination]), slot_data, slot_bias, position


def split_threads(work: int, parts: int) -> int:
    """Threads a call of `work` multiply-adds whose outputs split into `parts` tasks runs on (see the module doc)."""
    return tasks.threads_for(parts) if work >= SPLIT_MIN_WORK else 1


def chain_scratch(layers, n, dtype):
    """A scratch buffer for `csr_chain` on a batch of `n` rows (reusable for every call with `n` rows).

    None below TILE_MIN rows: sample by sample, a chain needs two feature vectors, which
    the kernel allocates itself (cheaper at batch 1 than a lock that guards a shared
    buffer). Otherwise zeros (2, W, tile) starting on a 64-byte boundary, W the widest
    vector the chain holds (its input or any layer's outputs), the tiles the fewest of at
    most TILE_BYTES of lanes (a whole number of SIMD widths) that cover the batch.
    """
    if n < TILE_MIN:
        return None
    dtype = np.dtype(dtype)
    tiles = -(-n // (TILE_BYTES // dtype.itemsize))
    tile = -(-n // tiles)
    tile += -tile % (BLOCK_BYTES // dtype.itemsize)  # whole SIMD registers
    # Zeros: lanes past the batch are summed too, so keep them finite.
    scratch = aligned_empty((2, _width(layers), tile), dtype)
    scratch[...] = 0
    return scratch


def aligned_empty(shape, dtype):
    """An uninitialized C-ordered array of `shape` starting on a 64-byte boundary (a cache line).

    The kernels' vector loads then never straddle two lines where a row starts: a
    buffer 16 bytes off made LeNet-300-100's chain and LeNet-5's and ResNet-20's CHWN
    convolutions 8-12% slower, and NumPy's allocator aligns to 16 bytes.
    """
    dtype = np.dtype(dtype)
    raw = np.empty(int(np.prod(shape)) * dtype.itemsize + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + raw.size - 64].view(dtype).reshape(shape)


def _width(layers):
    # The widest vector a chain holds: its input or any layer's outputs.
    width = layers[0, _K] if layers.shape[0] else 0
    for li in range(layers.shape[0]):
        width = max(width, layers[li, _F])
    return width


def _chain_rows(layers, ints, vals, x, out):
    # Sample by sample, layer by layer, one `_dot_slice` call per slice of SIMD-width
    # rows. Hidden vectors, in slice order, alternate between the two halves of scratch.
    # The calls name whole arrays and offsets, never views: numba counts a view's
    # references with atomic instructions, and three views per layer cost a tenth of
    # LeNet-300-100's chain at batch 1.
    step = BLOCK_BYTES // out.itemsize
    nl, width = layers.shape[0], _slice_width(layers, step)
    scratch = np.empty(2 * width, out.dtype)
    k0, fo = layers[0, _K], out.shape[1]
    for r in range(out.shape[0]):
        for li in range(nl):
            f, last = layers[li, _F], li == nl - 1
            padded = f + -f % step
            order, at = layers[li, _ORDER], np.int64(0)
            s0 = r * k0 if li == 0 else (li - 1) % 2 * width
            d0 = r * fo if last else li % 2 * width
            for s in range(0, f, step):
                _dot_slice(ints, vals, layers[li, _SLOTS] + at, layers[li, _SLOT_W] + at, order + s,
                           order + padded + s, layers[li, _SLOT_B] + s, x, scratch, out, s0, d0 if last else d0 + s,
                           li == 0, last, min(step, f - s), layers[li, _ACT], vals[layers[li, _ALPHA]])
                at += np.int64(ints[order + s]) * step


def _slice_width(layers, step):
    # The longest hidden vector of the sample-by-sample path: whole slices of outputs.
    width = 0
    for li in range(layers.shape[0] - 1):
        f = layers[li, _F]
        width = max(width, f + -f % step)
    return width


def _dot_slice_py(ints, vals, i0, w0, lengths, places, b0, x, scratch, out, s0, d0, first, last, lanes, act, alpha):
    # One slice of `step` rows reading src, x's values from s0 if `first` else scratch's,
    # into dst, out's values from d0 if `last` else scratch's: lane l sums, in order, its
    # row's lengths[l] connections vals[w0 + t * step + l] * src[s0 + ints[i0 + t * step + l]],
    # adds vals[b0 + l] and applies act (as `_bias_act`). With `last` the first `lanes`
    # go to dst[d0 + ints[places + l]], else the step lanes to dst[d0:d0 + step].
    step = BLOCK_BYTES // out.itemsize
    src = x.reshape(-1)[s0:] if first else scratch[s0:]
    dst = out.reshape(-1)[d0:] if last else scratch[d0:]
    length = ints[lengths:lengths + step]
    acc = np.zeros(step, out.dtype)
    for t in range(int(length[0])):
        k = ints[i0 + t * step:i0 + (t + 1) * step].astype(np.int64)
        with np.errstate(invalid="ignore"):  # an ended row's lane may multiply 0 by inf: np.where drops it
            acc = np.where(length > t, acc + vals[w0 + t * step:w0 + (t + 1) * step] * src[k], acc)
    for lane in range(step):
        _bias_act(acc[lane:lane + 1], 1, vals[b0 + lane], act, alpha)
    if last:
        dst[ints[places:places + lanes].astype(np.int64)] = acc[:lanes]
    else:
        dst[:step] = acc


@intrinsic
def _dot_slice_ir(typingctx, ints, vals, i0, w0, lengths, places, b0, x, scratch, out, s0, d0, first, last, lanes,
                   act, alpha):
    # `_dot_slice_py` with the slice's sums in one vector register: per step a vector load
    # of weights, the gathered inputs inserted lane by lane (AVX2's gather instruction
    # took 1.5-2x as long on AMD Zen 3), a multiply, an add, and a select that keeps a
    # lane's sum once its row has ended (so padding never reads an input into a sum:
    # 0 * inf would be NaN; running the steps every lane takes without it saved nothing).
    def codegen(context, builder, signature, args):
        (ints_v, vals_v, i0_v, w0_v, len_v, place_v, b0_v, x_v, scratch_v, out_v, s0_v, d0_v, first_v, last_v,
         lanes_v, act_v, alpha_v) = args
        ind, vd, xd, sc, od = [context.make_array(signature.args[i])(context, builder, v).data
                               for i, v in ((0, ints_v), (1, vals_v), (7, x_v), (8, scratch_v), (9, out_v))]
        sd = builder.gep(builder.select(first_v, xd, sc), [s0_v])
        dd = builder.gep(builder.select(last_v, od, sc), [d0_v])
        elt, ity = context.get_data_type(signature.args[9].dtype), context.get_data_type(signature.args[0].dtype)
        width = BLOCK_BYTES // context.get_abi_sizeof(elt)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        vec, ivec = ir.VectorType(elt, width), ir.VectorType(ity, width)
        zero = ir.Constant(vec, [ir.Constant(elt, 0.0)] * width)

        def load(data, offset, kind):
            return builder.load(builder.bitcast(builder.gep(data, [offset]), kind.as_pointer()), align=1)

        def index(offset):
            return builder.zext(builder.load(builder.gep(ind, [offset])), i64)

        length = load(ind, len_v, ivec)
        acc = cgutils.alloca_once_value(builder, zero)
        # Step t as a vector, compared signed (one instruction; rows are shorter than 2**31).
        steps = cgutils.alloca_once_value(builder, ir.Constant(ivec, [ir.Constant(ity, 0)] * width))
        with cgutils.for_range(builder, index(len_v)) as loop:
            t = loop.index
            at = builder.mul(t, ir.Constant(i64, width))
            base = builder.add(i0_v, at)
            if ity.width == 32 and sys.byteorder == "little":
                # Two indices per 64-bit load: a tenth faster than one load each.
                pairs = builder.bitcast(builder.gep(ind, [base]), i64.as_pointer())
                ks = []
                for lane in range(0, width, 2):
                    two = builder.load(builder.gep(pairs, [ir.Constant(i64, lane // 2)]), align=4)
                    ks += [builder.and_(two, ir.Constant(i64, 0xFFFFFFFF)), builder.lshr(two, ir.Constant(i64, 32))]
            else:
                ks = [index(builder.add(base, ir.Constant(i64, lane))) for lane in range(width)]
            gathered = ir.Constant(vec, ir.Undefined)
            for lane, k in enumerate(ks):
                gathered = builder.insert_element(gathered, builder.load(builder.gep(sd, [k])), ir.Constant(i32, lane))
            a = builder.load(acc)
            total = builder.fadd(a, builder.fmul(load(vd, builder.add(w0_v, at), vec), gathered))
            tv = builder.load(steps)
            builder.store(builder.add(tv, _splat(builder, ir.Constant(ity, 1), width)), steps)
            builder.store(builder.select(builder.icmp_signed(">", length, tv), total, a), acc)
        out = _finish(builder, builder.fadd(builder.load(acc), load(vd, b0_v, vec)), act_v, alpha_v, width)
        with builder.if_else(last_v) as (scattered, in_order):
            with in_order:
                builder.store(out, builder.bitcast(dd, vec.as_pointer()), align=1)
            with scattered:
                for lane in range(width):
                    with builder.if_then(builder.icmp_signed(">", lanes_v, ir.Constant(i64, lane))):
                        to = index(builder.add(place_v, ir.Constant(i64, lane)))
                        builder.store(builder.extract_element(out, ir.Constant(i32, lane)), builder.gep(dd, [to]))
        return context.get_dummy_value()

    return types.void(ints, vals, types.int64, types.int64, types.int64, types.int64, types.int64, x, scratch, out,
                      types.int64, types.int64, types.boolean, types.boolean, types.int64, types.int64,
                      out.dtype), codegen


_dot_slice = _dot_slice_py if JIT_DISABLED else _dot_slice_ir


def _splat(builder, value, width):
    # A vector of `width` copies of `value`.
    kind = ir.VectorType(value.type, width)
    one = builder.insert_element(ir.Constant(kind, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(kind, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width))


def _finish(builder, v, act, alpha, width):
    # `_bias_act` on a register v that holds the sums plus the bias: relu keeps v unless
    # v < 0, leaky relu keeps v if v > 0.
    i64 = ir.IntType(64)
    zero = ir.Constant(v.type, [ir.Constant(v.type.element, 0.0)] * width)
    relu = builder.select(builder.fcmp_ordered("<", v, zero), zero, v)
    leaky = builder.select(builder.fcmp_ordered(">", v, zero), v, builder.fmul(_splat(builder, alpha, width), v))
    out = builder.select(builder.icmp_signed("==", act, ir.Constant(i64, 1)), relu, v)
    return builder.select(builder.icmp_signed("==", act, ir.Constant(i64, 2)), leaky, out)


def _bias_act(d, m, bj, act, alpha):
    # d[:m] = act(d[:m] + bj): 0 none, 1 relu, 2 leaky relu of slope alpha.
    zero = d.dtype.type(0)
    if act == 0:
        for r in range(m):
            d[r] += bj
    elif act == 1:
        for r in range(m):
            v = d[r] + bj
            d[r] = zero if v < zero else v
    else:
        for r in range(m):
            v = d[r] + bj
            d[r] = v if v > zero else alpha * v


def _lanes_layer(ip, ix, w, b, act, alpha, src, s0, ss, dst, nb):
    # Feature-major: dst[j, :nb] = act(sum_p w[p] * src.flat[s0 + ix[p] * ss :][:nb] + b[j]),
    # in groups of at most TILE_BYTES of lanes, each summed in registers by `_dot_lanes`.
    group = TILE_BYTES // dst.itemsize
    for j in range(ip.shape[0] - 1):
        d = dst[j]
        for g in range(0, nb, group):
            _dot_lanes(ix, w, np.int64(ip[j]), np.int64(ip[j + 1]), src, s0 + g, ss, d, g, min(group, nb - g), b[j],
                       act, alpha)


def _dot_lanes_py(ix, w, p0, p1, src, s0, ss, dst, d0, lanes, bias, act, alpha):
    # dst.flat[d0:][:lanes] = act(the sum over p0 <= p < p1, in order, of
    # w[p] * src.flat[s0 + ix[p] * ss:][:lanes], plus bias), act as in `_bias_act`.
    s, acc = src.reshape(-1), np.zeros(lanes, dst.dtype)
    for p in range(p0, p1):
        k = s0 + int(ix[p]) * ss
        acc = acc + w[p] * s[k:k + lanes]
    _bias_act(acc, lanes, bias, act, alpha)
    dst.reshape(-1)[d0:d0 + lanes] = acc


@intrinsic
def _dot_lanes_ir(typingctx, ix, w, p0, p1, src, s0, ss, dst, d0, lanes, bias, act, alpha):
    # `_dot_lanes_py` with its partial sums held in vector registers, one per SIMD width
    # of lanes (at most TILE_BYTES // BLOCK_BYTES of them), loaded, multiplied and added
    # once per connection, and stored once, with the bias and activation applied: a
    # multiply-add costs one vector load of the source and no load or store of the sum
    # (the operations and their order are `_dot_lanes_py`'s). A switch on the register
    # count picks one of the loops; the lanes round up to whole registers, so the source
    # rows and dst must hold that many.
    def codegen(context, builder, signature, args):
        ix_v, w_v, p0_v, p1_v, src_v, s0_v, ss_v, dst_v, d0_v, lanes_v, bias_v, act_v, alpha_v = args
        data = [context.make_array(signature.args[i])(context, builder, v).data
                for i, v in ((0, ix_v), (1, w_v), (4, src_v), (7, dst_v))]
        ixd, wd, sd, dd = data
        elt = context.get_data_type(signature.args[4].dtype)
        size = context.get_abi_sizeof(elt)
        width = BLOCK_BYTES // size
        vec, i64 = ir.VectorType(elt, width), ir.IntType(64)
        zero = ir.Constant(vec, [ir.Constant(elt, 0.0)] * width)

        def at(data, offset):
            return builder.bitcast(builder.gep(data, [offset]), vec.as_pointer())

        regs = builder.udiv(builder.add(lanes_v, ir.Constant(i64, width - 1)), ir.Constant(i64, width))
        end = builder.append_basic_block("dot.end")
        switch = builder.switch(regs, end)
        for count in range(1, TILE_BYTES // BLOCK_BYTES + 1):
            block = builder.append_basic_block(f"dot.{count}")
            switch.add_case(ir.Constant(i64, count), block)
            builder.position_at_end(block)
            sums = [cgutils.alloca_once_value(builder, zero) for _ in range(count)]
            with cgutils.for_range_slice(builder, p0_v, p1_v, ir.Constant(i64, 1), inc=True) as (p, _):
                k = builder.add(s0_v, builder.mul(builder.zext(builder.load(builder.gep(ixd, [p])), i64), ss_v))
                wv = _splat(builder, builder.load(builder.gep(wd, [p])), width)
                for r, acc in enumerate(sums):
                    sv = builder.load(at(sd, builder.add(k, ir.Constant(i64, r * width))), align=size)
                    builder.store(builder.fadd(builder.load(acc), builder.fmul(wv, sv)), acc)
            bias = _splat(builder, bias_v, width)
            for r, acc in enumerate(sums):
                v = _finish(builder, builder.fadd(builder.load(acc), bias), act_v, alpha_v, width)
                builder.store(v, at(dd, builder.add(d0_v, ir.Constant(i64, r * width))), align=size)
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return types.void(ix, w, types.int64, types.int64, src, types.int64, types.int64, dst, types.int64, types.int64,
                      dst.dtype, types.int64, dst.dtype), codegen


_dot_lanes = _dot_lanes_py if JIT_DISABLED else _dot_lanes_ir


def _transpose_block_py(src, s0, ss, dst, d0, ds, m):
    # dst.flat[d0 + c*ds + r] = src.flat[s0 + r*ss + c] for r, c < BLOCK_BYTES // itemsize,
    # reading only the first m rows of src (1 <= m): the others count as zeros.
    b = BLOCK_BYTES // src.itemsize
    s, d = src.reshape(-1), dst.reshape(-1)
    for r in range(b):
        for c in range(b):
            d[d0 + c * ds + r] = s[s0 + r * ss + c] if r < m else 0


@intrinsic
def _transpose_block_ir(typingctx, src, s0, ss, dst, d0, ds, m):
    # `_transpose_block_py` as B vector loads (of zeros past row m), log2(B) rounds of B
    # two-register shuffles (round d swaps the off-diagonal d x d sub-blocks of every
    # 2d x 2d block) and B vector stores; numba has no SIMD types, so it is written in
    # LLVM IR.
    def codegen(context, builder, signature, args):
        src_v, s0_v, ss_v, dst_v, d0_v, ds_v, m_v = args
        sdata = context.make_array(signature.args[0])(context, builder, src_v).data
        ddata = context.make_array(signature.args[3])(context, builder, dst_v).data
        elt = context.get_data_type(signature.args[0].dtype)
        size = context.get_abi_sizeof(elt)
        b = BLOCK_BYTES // size
        vec = ir.VectorType(elt, b).as_pointer()

        def at(data, base, stride, i):
            offset = builder.add(base, builder.mul(stride, ir.Constant(stride.type, i)))
            return builder.bitcast(builder.gep(data, [offset]), vec)

        rows = [builder.load(at(sdata, s0_v, ss_v, 0), align=size)]
        for r in range(1, b):
            row = cgutils.alloca_once_value(builder, ir.Constant(vec.pointee, None))
            with builder.if_then(builder.icmp_signed(">", m_v, ir.Constant(m_v.type, r)), likely=True):
                builder.store(builder.load(at(sdata, s0_v, ss_v, r), align=size), row)
            rows.append(builder.load(row))
        d = b // 2
        while d:
            new = list(rows)
            for i in (i for i in range(b) if not i & d):
                lo = [j if not j & d else b + j - d for j in range(b)]
                hi = [j + d if not j & d else b + j for j in range(b)]
                for k, mask in ((i, lo), (i + d, hi)):
                    new[k] = builder.shuffle_vector(rows[i], rows[i + d], ir.Constant(ir.VectorType(ir.IntType(32), b),
                                                                                       mask))
            rows, d = new, d // 2
        for c in range(b):
            builder.store(rows[c], at(ddata, d0_v, ds_v, c), align=size)
        return context.get_dummy_value()

    return types.void(src, types.intp, types.intp, dst, types.intp, types.intp, types.intp), codegen


_transpose_block = _transpose_block_py if JIT_DISABLED else _transpose_block_ir


def _make_tiles(feature_major):
    # The tiled chain loop for row-major input (N, K) or, with `feature_major`, for input
    # already feature-major (K, N): the constant is frozen into the compiled code.

    def tiles(layers, ints, vals, x, out, scratch):
        # Batch tiles of `tile` rows, one after the other. Row-major input: the blocks of
        # input columns the first layer reads are transposed into scratch (the only
        # transpose of the input).
        # Feature-major input: read in place when whole registers of lanes fit in its rows
        # (N a multiple of the SIMD width), else the rows the first layer reads are copied
        # into scratch. Every layer then stays feature-major in scratch, and the last
        # layer's tile is transposed, in blocks too, into its rows of `out`.
        n, k = out.shape[0], layers[0, _K]
        rows = x.reshape((k, n)) if feature_major else x.reshape((n, k))
        nl = layers.shape[0]
        tile = scratch.shape[2]
        ntiles = (n + tile - 1) // tile
        nblocks, blocks = layers[0, _NBLK], layers[0, _BLK]
        bw = BLOCK_BYTES // rows.itemsize
        a, b = scratch[0], scratch[1]
        for q in range(ntiles):
            r0 = q * tile
            nb = min(tile, n - r0)
            full = nb - nb % bw
            src, s0, ss = a, 0, tile
            if feature_major and n % bw == 0:
                src, s0, ss = rows, r0, n  # read in place: whole registers of lanes stay inside a row
            elif feature_major:
                for e in range(nblocks):
                    c0 = np.int64(ints[blocks + e])
                    for c in range(c0, min(c0 + bw, k)):
                        xr, ar = rows[c], a[c]
                        for r in range(nb):
                            ar[r] = xr[r0 + r]
            else:
                # Block columns outermost: the stores fill a few scratch rows at a
                # time (rows outermost measured 2.3x slower). The rows past the last
                # whole register of lanes are a block of zero-padded rows (element by
                # element, a batch of 5-7 took 1.7-2.2x the time of a batch of 8).
                for e in range(nblocks):
                    c0 = np.int64(ints[blocks + e])
                    if c0 + bw <= k:
                        for r in range(0, nb, bw):
                            _transpose_block(rows, (r0 + r) * k + c0, k, a, c0 * tile + r, tile, min(bw, nb - r))
                        rest = nb
                    else:
                        rest = 0
                    for c in range(c0, min(c0 + bw, k)):
                        dst = a[c]
                        for r in range(rest, nb):
                            dst[r] = rows[r0 + r, c]
            for li in range(nl):
                dst = b if li % 2 == 0 else a
                f, nnz, ptr, idx = layers[li, _F], layers[li, _NNZ], layers[li, _PTR], layers[li, _IDX]
                _lanes_layer(ints[ptr:ptr + f + 1], ints[idx:idx + nnz], vals[layers[li, _W]:layers[li, _W] + nnz],
                             vals[layers[li, _B]:layers[li, _B] + f], layers[li, _ACT], vals[layers[li, _ALPHA]],
                             src, s0, ss, dst, nb)
                src, s0, ss = dst, 0, tile
            fo = out.shape[1]
            for j0 in range(0, fo - fo % bw, bw):
                for r in range(0, full, bw):
                    _transpose_block(src, j0 * tile + r, tile, out, (r0 + r) * fo + j0, fo, bw)
            for r in range(nb):
                o = out[r0 + r]
                for j in range(fo - fo % bw if r < full else 0, fo):
                    o[j] = src[j, r]

    return tiles


_width = jit(_width)
_bias_act = jit(_bias_act)
_slice_width = jit(_slice_width)
_lanes_layer = jit(_lanes_layer)
_ROWS = jit(_chain_rows)
_TILES = {fm: jit(_make_tiles(fm)) for fm in (False, True)}


def chain_kernel(scratch, feature_major=False):
    """The compiled loop `csr_chain` runs with a scratch from `chain_scratch`; callers on a hot path call it directly.

    Without scratch (None) the loop is ``kernel(layers, ints, vals, x, out)``, sample by
    sample, on row-major input; with one, ``kernel(layers, ints, vals, x, out, scratch)``
    in batch tiles, reading its input as (K_0, N) with `feature_major`.
    """
    if scratch is None:
        if feature_major:
            raise ValueError(f"a feature-major chain input needs at least {TILE_MIN} rows")
        return _ROWS
    return _TILES[bool(feature_major)]


def csr_chain(layers, ints, vals, x, out, scratch=None, feature_major=False):
    """out = the chain's output for the rows of x: h_{l+1} = act_l(h_l @ W_l.T + b_l), h_0 = x.

    layers, ints, vals from `pack_chain`; x (N, K_0), or any C-contiguous (N, ...) holding K_0
    values per sample (read as (N, K_0): flattening costs no Python call), out (N, F_last),
    C-contiguous, of vals' dtype; scratch from `chain_scratch` for N rows (its contents are
    overwritten; None below TILE_MIN rows).
    With `feature_major`, x holds the samples as columns instead: (K_0, N), or any
    C-contiguous (..., N) read as (K_0, N) (a CHWN activation); the result is the same.
    O(N * (nnz + K_0 + F_last)) time. Without scratch: sample by sample, in slices of
    SIMD-width rows whose gathered dot products share a register (a feature-major x is
    transposed first). Otherwise batch tiles,
    feature-major inside the tile, with the bias and the activation applied as each
    output row is finished. ValueError for an x or out of another size, dtype or layout,
    or a scratch of another shape than (2, >= W, a whole number of SIMD widths) C-ordered
    in vals' dtype: the kernels read and write whole registers of lanes, unchecked.
    """
    f, k = (layers[-1, _F], layers[0, _K]) if layers.shape[0] else (0, 0)
    if out.ndim != 2 or out.shape[1] != f or x.size != out.shape[0] * k:
        raise ValueError(f"a chain of {k} inputs and {f} outputs needs out (N, {f}) and x of N x {k} values, "
                         f"got x {x.shape} and out {out.shape}")
    for name, a in (("x", x), ("out", out)):
        if a.dtype != vals.dtype or not a.flags.c_contiguous:
            raise ValueError(f"a chain's {name} must be C-ordered {vals.dtype}, got {a.dtype}"
                             f"{'' if a.flags.c_contiguous else ' strided'}")
    if scratch is None:
        if feature_major:
            x = np.ascontiguousarray(x.reshape(-1, out.shape[0]).T)
        _ROWS(layers, ints, vals, x, out)
        return
    width, simd = _width(layers), BLOCK_BYTES // vals.itemsize
    if (scratch.dtype != vals.dtype or not scratch.flags.c_contiguous or scratch.ndim != 3 or scratch.shape[0] != 2
            or scratch.shape[1] < width or scratch.shape[2] % simd):
        raise ValueError(f"a chain's scratch must be C-ordered {vals.dtype} (2, >= {width}, a multiple of {simd}), "
                         f"got {scratch.dtype} {scratch.shape}")
    _TILES[bool(feature_major)](layers, ints, vals, x, out, scratch)


def _taps(indices, kh, kw):
    # Per kept weight (column c*KH*KW + i*KW + k): rows c, i and k of a (3, nnz) table,
    # decoded once per call rather than per image, filter or output row.
    nnz = indices.shape[0]
    taps = np.empty((3, nnz), np.int64)
    khw = kh * kw
    for p in range(nnz):
        col = np.int64(indices[p])
        c = col // khw
        i = (col - c * khw) // kw
        taps[0, p], taps[1, p], taps[2, p] = c, i, col - c * khw - i * kw
    return taps


def _conv(kh, kw, sh, sw, indptr, indices, data, bias, act, alpha, xp, out):
    # Direct sparse convolution: each kept weight w[j, c, i, k] adds w times a window of
    # input plane c to output plane j. The planes are taken flat: output pixel (a, b)
    # sits at a * Wp + b of a row-wide accumulator, and every kept weight is one
    # contiguous multiply-add of (OH - 1) * Wp + OW lanes, input shifted by
    # c * Hp * Wp + i * Wp + k (the Wp - OW wrapped lanes of each row are computed and
    # dropped). One long loop instead of OH loops of OW lanes: LeNet-5's conv2 has OW =
    # 8, a single float32 vector. A strided convolution first splits each padded plane
    # into its SH * SW phases (rows r, r + SH, ...; columns s, s + SW, ...): weight
    # (c, i, k) then reads phase (i % SH, k % SW) of plane c at stride 1, shifted by
    # (i // SH, k // SW), so it too is one contiguous multiply-add (against a gather of
    # every SW-th value row by row, 2.0-3.3x faster on a pruned ResNet-20's strided
    # convolutions at batch 1 and 3.6-4.4x at batch 8). Four weights are added per pass
    # over the accumulator, one after the other (the order of the sum is unchanged), and
    # each weight's (c, i, k) is decoded once per call (`_taps`), not once per image and
    # filter: against one weight per pass and decoding in the loop, 1.2-1.3x faster on
    # ResNet-20's stride-1 convolutions at batch 1, 1.1-1.25x on LeNet-5's at batch 1 and
    # 1.25-1.8x at batch 8. Each plane's sum runs over the kept weights in index order,
    # then the bias and the activation (`_bias_act`).
    nimg, nch, hp, wp = xp.shape
    f, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    zero = out.dtype.type(0)
    taps = _taps(indices, kh, kw)
    tc, ti, tk = taps[0], taps[1], taps[2]
    if sh == 1 and sw == 1:
        hq, wq, xq = hp, wp, xp
    else:
        hq, wq = (hp + sh - 1) // sh, (wp + sw - 1) // sw
        xq = np.zeros((nimg, nch * sh * sw, hq, wq), xp.dtype)
        for n in range(nimg):
            for c in range(nch):
                for r in range(sh):
                    for s in range(sw):
                        phase = xp[n, c, r::sh, s::sw]
                        xq[n, (c * sh + r) * sw + s, :phase.shape[0], :phase.shape[1]] = phase
        tc = (tc * sh + ti % sh) * sw + tk % sw
        ti, tk = ti // sh, tk // sw
    start = (tc * hq + ti) * wq + tk  # where each weight's window starts in the flat image
    span = (oh - 1) * wq + ow
    xf = xq.reshape((nimg, xq.shape[1] * hq * wq))
    planes = out.reshape((nimg, f, oh * ow))
    acc = np.empty(span, out.dtype)
    for n in range(nimg):
        image = xf[n]
        for j in range(f):
            for r in range(span):
                acc[r] = zero
            p, p1 = indptr[j], indptr[j + 1]
            while p + 4 <= p1:  # four weights per pass, added one after the other: the same sum
                s0, s1, s2, s3 = image[start[p]:], image[start[p + 1]:], image[start[p + 2]:], image[start[p + 3]:]
                w0, w1, w2, w3 = data[p], data[p + 1], data[p + 2], data[p + 3]
                for r in range(span):
                    acc[r] = (((acc[r] + w0 * s0[r]) + w1 * s1[r]) + w2 * s2[r]) + w3 * s3[r]
                p += 4
            while p < p1:
                src = image[start[p]:]
                w = data[p]
                for r in range(span):
                    acc[r] += w * src[r]
                p += 1
            o = planes[n, j]
            for a in range(oh):
                for b in range(ow):
                    o[a * ow + b] = acc[a * wq + b]
            _bias_act(o, oh * ow, bias[j], act, alpha)


_taps = jit(_taps)
_CONV = jit(_conv)


def csr_conv2d(kh, kw, sh, sw, indptr, indices, data, bias, xp, out, act=0, alpha=0):
    """Cross-correlate a zero-padded input with CSR filters, then add the bias and apply an activation.

    The filters W (F, C, KH, KW) are a CSR matrix of shape (F, C*KH*KW) whose column
    ``c*KH*KW + i*KW + k`` is w[:, c, i, k] (the im2col order). xp (N, C, Hp, Wp) is
    the already padded input, out (N, F, OH, OW) with OH = (Hp - KH) // sh + 1.
    out[n, j, a, b] = act(sum_{c,i,k} w[j, c, i, k] * xp[n, c, a*sh + i, b*sw + k] + bias[j]),
    act an ACTIVATIONS code (0 none, 1 relu, 2 leaky relu of slope `alpha`).
    O(N*nnz*OH*Wp/SW + N*F*OH*OW + N*C*Hp*Wp) time, scratch of OH*Wp/SW values (and a
    phase-split copy of the input when strided); on the calling thread.
    """
    _CONV(kh, kw, sh, sw, indptr, indices, data, bias, act, data.dtype.type(alpha), xp, out)


def _add_run(d, xrow, w, b0, b1, s, sw, n):
    # d[b*n:(b+1)*n] += w * (input column b*sw + s of the row xrow, N lanes) for output columns b in [b0, b1).
    src, dst = xrow[(b0 * sw + s) * n:], d[b0 * n:]
    if sw == 1:
        for r in range((b1 - b0) * n):
            dst[r] += w * src[r]
    else:
        for b in range(b1 - b0):
            # Slices, not offsets: an index that is a sum could be negative to numba, whose
            # wraparound check would keep the loop scalar.
            db, sb = dst[b * n:], src[b * sw * n:]
            for r in range(n):
                db[r] += w * sb[r]


def _conv_chwn(kh, kw, sh, sw, ph, pw, indptr, indices, data, bias, act, alpha, x, out, a0, a1):
    # Direct sparse convolution on CHWN activations: an output row (OW, N) of filter j is
    # OW * N contiguous lanes. At column stride 1 a kept weight adds w times one
    # contiguous run of its input row, shifted by k - pw columns of N lanes (padding only
    # shortens the run, or skips the row); at a larger stride, one run of N lanes per
    # output column. Four kept weights are added per pass over the output columns all
    # four reach, one after the other, so each lane there is loaded and stored once per
    # four products; the columns only some of them reach (next to the padding) then get
    # each weight's product in turn, so every output still sums its products in index
    # order. The bias and the activation end each output row while it is in cache.
    # Output rows outermost: the few input rows that one output row reads stay in cache
    # while every filter reads them, where filters outermost sweep the whole input once
    # per filter. Measured on a pruned ResNet-20 at batch 64 against filters outermost:
    # 1.1-1.2x faster on the 16-channel 28x28 convolutions and 1.1-1.3x on the strided
    # one that reads them, 0.85-0.97x on the 64-channel 7x7 ones, even on LeNet-5's two.
    # Computes output rows [a0, a1); each output's sum runs over the kept weights in
    # index order, then the bias, however the rows are split.
    nch, h, wd, n = x.shape
    f, oh, ow = out.shape[0], out.shape[1], out.shape[2]
    zero = out.dtype.type(0)
    xf = x.reshape((nch, h, wd * n))
    of = out.reshape((f, oh, ow * n))
    m = ow * n
    taps = _taps(indices, kh, kw)
    tc, ti = taps[0], taps[1]
    # Per weight: the output columns [b0, b1) whose input column b * sw + k - pw lies inside
    # the image, and that column's offset k - pw.
    ts = taps[2] - pw
    tb0, tb1 = np.empty_like(ts), np.empty_like(ts)
    for p in range(ts.shape[0]):
        if sw == 1:
            tb0[p], tb1[p] = max(0, -ts[p]), min(ow, wd - ts[p])
        else:
            tb0[p], tb1[p] = max(0, -(ts[p] // sw)), min(ow, (wd - ts[p] + sw - 1) // sw)
    for a in range(a0, a1):
        top = a * sh - ph  # the input row of i = 0
        for j in range(f):
            p0, p1 = indptr[j], indptr[j + 1]
            d = of[j, a]
            for r in range(m):
                d[r] = zero
            p = p0
            while p < p1:
                row0 = top + ti[p]
                if p + 4 <= p1 and 0 <= row0 < h:
                    row1, row2, row3 = top + ti[p + 1], top + ti[p + 2], top + ti[p + 3]
                    lo = max(max(tb0[p], tb0[p + 1]), max(tb0[p + 2], tb0[p + 3]))
                    hi = min(min(tb1[p], tb1[p + 1]), min(tb1[p + 2], tb1[p + 3]))
                    if 0 <= row1 < h and 0 <= row2 < h and 0 <= row3 < h and lo < hi:
                        w0, w1, w2, w3 = data[p], data[p + 1], data[p + 2], data[p + 3]
                        r0, r1 = xf[tc[p], row0], xf[tc[p + 1], row1]
                        r2, r3 = xf[tc[p + 2], row2], xf[tc[p + 3], row3]
                        x0, x1 = r0[(lo * sw + ts[p]) * n:], r1[(lo * sw + ts[p + 1]) * n:]
                        x2, x3 = r2[(lo * sw + ts[p + 2]) * n:], r3[(lo * sw + ts[p + 3]) * n:]
                        dst = d[lo * n:]
                        if sw == 1:
                            for r in range((hi - lo) * n):
                                dst[r] = (((dst[r] + w0 * x0[r]) + w1 * x1[r]) + w2 * x2[r]) + w3 * x3[r]
                        else:
                            for b in range(hi - lo):
                                db, i = dst[b * n:], b * sw * n
                                y0, y1, y2, y3 = x0[i:], x1[i:], x2[i:], x3[i:]
                                for r in range(n):
                                    db[r] = (((db[r] + w0 * y0[r]) + w1 * y1[r]) + w2 * y2[r]) + w3 * y3[r]
                        # The columns left and right of [lo, hi) that each weight reaches, weight by weight.
                        for t, rt, wt in ((p, r0, w0), (p + 1, r1, w1), (p + 2, r2, w2), (p + 3, r3, w3)):
                            if tb0[t] < lo:
                                _add_run(d, rt, wt, tb0[t], lo, ts[t], sw, n)
                            if hi < tb1[t]:
                                _add_run(d, rt, wt, hi, tb1[t], ts[t], sw, n)
                        p += 4
                        continue
                if 0 <= row0 < h and tb0[p] < tb1[p]:
                    _add_run(d, xf[tc[p], row0], data[p], tb0[p], tb1[p], ts[p], sw, n)
                p += 1
            _bias_act(d, m, bias[j], act, alpha)


_add_run = jit(_add_run)
_CONV_CHWN = jit(_conv_chwn)


def csr_conv2d_chwn(kh, kw, sh, sw, ph, pw, indptr, indices, data, bias, act, alpha, x, out, threads=None):
    """A convolution with CSR filters on CHWN activations, then the bias and an activation.

    x (C, H, W, N) unpadded, out (F, OH, OW, N) with OH = (H + 2*PH - KH) // SH + 1 (OW
    alike), both C-contiguous of data's dtype; the filters as in `csr_conv2d`. act is an
    ACTIVATIONS code (0 none, 1 relu, 2 leaky relu with slope `alpha`, of data's dtype).
    out[j, a, b, n] = act(sum_{c,i,k} w[j, c, i, k] * xpad[c, a*SH + i, b*SW + k, n] + bias[j]),
    xpad the zero-padded input, summed over the kept weights in index order (the
    padding's zeros are skipped, not added): the values of `csr_conv2d`, sample by sample.
    O(nnz * OH * OW * N + F * OH * OW * N) time, no scratch. The output rows are cut into
    up to four tasks per thread for `sclref.kernels.tasks.run_tasks`; `threads` defaults
    to `split_threads` for the N * OH * OW * max(nnz, F) multiply-adds.
    """
    f, oh, ow, n = out.shape
    if threads is None:
        threads = split_threads(n * oh * ow * max(data.shape[0], f), oh)
    args = (kh, kw, sh, sw, ph, pw, indptr, indices, data, bias, act, alpha, x, out)
    if threads <= 1:
        _CONV_CHWN(*args, 0, oh)
        return
    parts = min(oh, 4 * threads)
    tasks.run_tasks(parts, lambda i, slot: _CONV_CHWN(*args, i * oh // parts, (i + 1) * oh // parts), threads)


def _maxpool_chwn(kh, kw, sh, sw, x, out):
    # An output row (OW, N) is the max of KH*KW strided reads of input rows, N contiguous
    # lanes at a time. np.maximum on scalars: NaN wins as in NumPy, and it vectorizes
    # (a compare and a select written out measured 3-7x slower).
    nch, oh, ow, n = out.shape
    for ch in range(nch):
        for a in range(oh):
            o = out[ch, a]
            for i in range(kh):
                src = x[ch, a * sh + i]
                for k in range(kw):
                    for b in range(ow):
                        s, d = src[b * sw + k], o[b]
                        if i == 0 and k == 0:
                            for r in range(n):
                                d[r] = s[r]
                        else:
                            for r in range(n):
                                d[r] = np.maximum(d[r], s[r])


_MAXPOOL_CHWN = jit(_maxpool_chwn)


def maxpool_chwn(kh, kw, sh, sw, x, out):
    """out[c, a, b, :] = max over the (KH, KW) window at (a*SH, b*SW) of x[c, ..., :]: max pooling on CHWN.

    x (C, H, W, N), out (C, OH, OW, N) with OH = (H - KH) // SH + 1 (OW alike), C-contiguous,
    one dtype; no padding. O(C * OH * OW * KH * KW * N) time, memory-bound.
    """
    _MAXPOOL_CHWN(kh, kw, sh, sw, x, out)


@functools.lru_cache(maxsize=None)
def _maxpool_planes(kh, kw):
    # `maxpool_nchw`'s loop for one window size: a compile-time window unrolls into a chain
    # of maxima per output, in the window's row-major order (np.maximum on scalars: NaN wins).
    def pool(x, sh, sw, out):
        for p in range(out.shape[0]):
            plane, o = x[p], out[p]
            for a in range(out.shape[1]):
                for b in range(out.shape[2]):
                    best = plane[a * sh, b * sw]
                    for i in range(kh):
                        for j in range(kw):
                            if i or j:
                                best = np.maximum(best, plane[a * sh + i, b * sw + j])
                    o[a, b] = best

    return jit(pool)


def maxpool_nchw(kh, kw, sh, sw, x, out):
    """out[n, c, a, b] = max over the (KH, KW) window at (a*SH, b*SW) of x[n, c]: max pooling on NCHW.

    x (N, C, H, W), out (N, C, OH, OW) with OH = (H - KH) // SH + 1 (OW alike), C-contiguous
    (ValueError otherwise), one dtype; no padding. Values only (training's `maxpool2d_fwd` also finds each window's
    argmax). O(N * C * OH * OW * KH * KW) time; compiles once per window size. With the JIT
    off, NumPy's maxima of the window's strided views, in the same order (the interpreted
    loop took 140x as long).
    """
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    if kh > h or kw > w or out.shape != (n, c, oh, ow) or not out.flags.c_contiguous:
        # The loop writes `out` through a flat view and reads x without bounds checks.
        raise ValueError(f"{kh}x{kw} max pooling at stride {sh}x{sw} of x {x.shape} needs a C-ordered out "
                         f"{(n, c, oh, ow)}, got {out.shape}{'' if out.flags.c_contiguous else ' strided'}")
    if JIT_DISABLED:
        out[...] = x[:, :, :sh * (oh - 1) + 1:sh, :sw * (ow - 1) + 1:sw]
        for i in range(kh):
            for k in range(kw):
                if i or k:
                    np.maximum(out, x[:, :, i:i + sh * (oh - 1) + 1:sh, k:k + sw * (ow - 1) + 1:sw], out=out)
        return
    _maxpool_planes(int(kh), int(kw))(x.reshape(n * c, h, w), sh, sw, out.reshape(n * c, *out.shape[2:]))
