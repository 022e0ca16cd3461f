"""All-reduce -> residual add -> RMSNorm (-> FP8 static quant) in one Triton kernel over symmetric memory.

Each rank's kernel pushes its partial sums straight into its peers' workspaces (the peer pointers torch's
symmetric memory hands out) and reduces what its peers pushed into its own, so the reduction, the residual update,
the norm and the quant happen where the sum is formed: no all-reduced tensor is written and read back, and there is
one launch instead of two. Every transfer between GPUs is a store (NVLink writes are posted; a read would wait a
round trip), and every read of the sum is local.

- **One-shot** (small tensors, ``_one_shot_kernel``): every rank stores its partial rows into a slot of every
  peer's workspace, then sums every row over its own partial rows and the slots, in rank order, adds the residual,
  normalises and quantises it. No meeting: a slot's elements hold an *empty mark* until a peer's value lands there
  (the bits of -0.0, which a pushed value never has: -0.0 is pushed as +0.0, and a sum that starts from +0.0 does
  not see the difference). A rank reads each peer row until no element holds the mark, then marks it empty again,
  so each element crosses NVLink once and nothing waits for more than the data it needs. This is the Lamport
  scheme of TensorRT-LLM's one-shot kernel (FlashInfer's ``allreduce_fusion``), here with the clear right after
  the read.
- **A row split over programs** (one-shot, few rows): ``SPLIT`` programs share a row, each pushing, reducing and
  normalising one part of it, so a decode step's row is not left to one multiprocessor. The norm needs the whole
  row's sum of squares: each program stores its part's (fp64, never negative) into the rank's own partials area,
  which holds the same empty mark (negative as an int64), and reads the row's parts once none is negative. The
  last program out marks them empty again (every program has read them by then). FlashInfer spreads a row over a
  cluster of CTAs for the same reason.
- **Two-shot** (larger tensors, ``_two_shot_kernel``): rank r owns rows [r S, (r + 1) S), S = ceil(M / world).
  Each rank stores the rows each peer owns into that peer's slots; each rank reduces its own rows as they land,
  adds the residual and stores the new residual rows into every peer's gather area; every rank takes the other
  ranks' residual rows from its own gather area as they land and normalises and quantises every row itself (the
  same bits: the same row, the same code). Each rank sends the tensor twice instead of world - 1 times, and the
  output never crosses NVLink. Slots and gather area are empty-marked like the one-shot's, so nothing waits for a
  meeting of all programs, only for the rows it reads. A split row's programs also store their part's sum of
  squares into every rank's partials area, so that every rank normalises the row's parts with the owner's sum.
  A new residual is never -0.0 (its sum starts from +0.0); were one, every rank would store it as +0.0, since
  -0.0 is the gather area's empty mark.

**One poll for all peers' rows (one-shot, TP > 2).** Where the block fits (``TAKE_AT_ONCE`` elements: peers x
part), a one-shot program loads every peer's part of a row as one [peers, part] block and polls until none of it
holds the mark: the loads overlap, where taking them one after another would wait a local round trip (and a
block-wide reduction) per peer. The rows then join the sum in rank order, each picked out exactly (the other rows
add zeros). At TP=4 this took 0.5-13.6% off the one-shot at 1-8 tokens (H200, 2026-11-28, docs/benchmarks.md).

Numerics are ``numerics``' (``all_reduce_sum``, ``residual_add``, ``rms_norm``, ``quant_fp8_static``): the sum is
taken in fp32 in rank order and rounded once, so every rank holds the same bits, and one-shot and two-shot agree.

**The call counter and the workspace halves.** Calls alternate between the two halves of a workspace by the
parity of a call counter kept in the signal pad. Every program reads it first; the last program to finish (an
arrival count, acq_rel atomics) advances it, so the next call on this rank reads the next value whatever its grid,
and a captured CUDA graph replays as it is. A rank writes into a peer's half again two calls later, by which time
the peer has finished the call that read it: the rank could not have finished the call between without the peer's
rows of that call, which the peer pushed only after its earlier call had ended (read and re-marked the half). A
two-shot rank writes into a peer only where one of them owns rows, and then it waits for that peer's rows too.

Both kernels need every program of a launch resident at once (at most one per multiprocessor): every rank
launches the same grid for the same tensor, and program p handles the same rows on every rank, so a program only
ever waits on a peer's program of its own number, or on its own rank's programs of the same row; the grid is as
small as the rows allow (one program for a one-token decode step's part).

``PHASE_FIRST`` / ``PHASE_LAST`` select which phases (0 push, 1 reduce, 2 normalise a split row (and the
two-shot's gather), 3 clear the partials (without ``SYNC``)) a launch runs and ``SYNC`` whether the call counter
and the last program's clear are used: on GPUs one launch runs all of them; tests on CPU run each phase for every
simulated rank in turn in Triton's interpreter, one process holding every rank's workspace (and only its first
half).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import symm_mem
from .collectives import group_size
from .numerics import FP8_DTYPE, FP8_MAX, SQUARE_GROUP, squares_paired
from .triton_rows import fp8_codes, inverse_width_bits, normalized_by, reciprocal, sum_of_squares

PHASE_COPY, PHASE_REDUCE, PHASE_NORMALISE, PHASE_CLEAR = 0, 1, 2, 3
# The most programs a one-shot row is split over; its partials area keeps this many sums of squares per row.
MAX_SPLIT = 8
# The fewest elements one program of a split row takes.
MIN_PART = 1024
# The most elements (peers x part) a one-shot program polls for at once; beyond, it takes its peers' rows one after
# another, as the two-shot always does (measured: at once, its larger code spills and is 5-9% slower at 64-256
# tokens) and as one peer (TP=2) does, with nothing to overlap.
TAKE_AT_ONCE = 8192
# The empty mark of a one-shot slot element, by element size: the bits of -0.0 read as a signed integer.
_MARK_DTYPES = {2: (torch.int16, tl.int16), 4: (torch.int32, tl.int32)}


def _part_warps(part: int) -> int:
    """Warps for a program's part of a row: 4 up to 1024 columns, 8 up to 4096, else 16 (the row kernel's rule
    until 2026-12-07; this kernel waits on its peers' rows, and it has not been timed at other warps)."""
    return 4 if part <= 1024 else 8 if part <= 4096 else 16


def _empty_mark(dtype: torch.dtype) -> tuple[torch.dtype, object, int]:
    """(the integer torch dtype and Triton dtype of ``dtype``'s width, the bits of -0.0 in it)."""
    if dtype.itemsize not in _MARK_DTYPES or not dtype.is_floating_point:
        raise ValueError(f"the fused all-reduce's one-shot form takes 16- and 32-bit floats, not {dtype}")
    torch_int, triton_int = _MARK_DTYPES[dtype.itemsize]
    return torch_int, triton_int, torch.iinfo(torch_int).min


def _partial_mark(dtype: torch.dtype) -> int:
    """The empty mark of ``dtype``'s elements repeated over 8 bytes, as a signed int64 (negative: its top bit is
    the mark's sign bit): what a partials entry holds until its program stores a sum of squares."""
    torch_int, _, bits = _empty_mark(dtype)
    width = 8 * dtype.itemsize
    word = sum((bits & ((1 << width) - 1)) << (width * k) for k in range(8 // dtype.itemsize))
    return word - (1 << 64)


def mark_empty(buffer: torch.Tensor, dtype: torch.dtype) -> None:
    """Fill a one-shot workspace (bytes) with the empty mark of ``dtype``: every slot element waits for a value."""
    torch_int, _, bits = _empty_mark(dtype)
    usable = buffer.numel() // dtype.itemsize * dtype.itemsize
    buffer[:usable].view(torch_int).fill_(bits)


@triton.jit
def _take(slot, mask, MARK: tl.constexpr, BLOCK: tl.constexpr):
    """A peer's row from ``slot`` (bits) once every element has landed (none holds the empty mark any more), its
    place marked empty again for the call two calls on."""
    bits = tl.load(slot, mask=mask, other=0, volatile=True)
    while tl.max((bits == MARK).to(tl.int32), axis=0) > 0:
        bits = tl.load(slot, mask=mask, other=0, volatile=True)
    tl.store(slot, tl.full([BLOCK], MARK, slot.dtype.element_ty), mask=mask)
    return bits


@triton.jit
def _take_rows(first, stride, rows, mask, MARK: tl.constexpr, ROWS: tl.constexpr):
    """Several rows' parts at once (row j's at the places ``first + j * stride``, where ``rows[j]``), once no
    element of any holds the empty mark, their places marked empty again: one poll for all of them, so their loads
    overlap instead of waiting on each other. [ROWS, part] bits, zeros where masked."""
    places = first[None, :] + tl.arange(0, ROWS)[:, None].to(tl.int64) * stride
    both = rows[:, None] & mask[None, :]
    bits = tl.load(places, mask=both, other=0, volatile=True)
    while tl.max(tl.max((bits == MARK).to(tl.int32), axis=1), axis=0) > 0:
        bits = tl.load(places, mask=both, other=0, volatile=True)
    tl.store(places, tl.full(bits.shape, MARK, bits.dtype), mask=both)
    return bits


@triton.jit
def _row_of(block, j, ROWS: tl.constexpr):
    """Row ``j`` of a [ROWS, BLOCK] fp32 block, exactly (the other rows add zeros)."""
    return tl.sum(tl.where(tl.arange(0, ROWS)[:, None] == j, block, 0.0), axis=0)


@triton.jit
def _landed_sum(partials, SPLIT: tl.constexpr):
    """The sum of a row's ``SPLIT`` parts' sums of squares once every part is in (none holds a negative mark)."""
    bits = tl.load(partials + tl.arange(0, SPLIT), volatile=True)
    while tl.min(bits, axis=0) < 0:
        bits = tl.load(partials + tl.arange(0, SPLIT), volatile=True)
    return tl.sum(bits.to(tl.float64, bitcast=True), axis=0)


@triton.jit
def _clear_partials(partials, count, PARTIAL_MARK: tl.constexpr):
    """Mark the first ``count`` partials entries empty again."""
    offs = tl.arange(0, 1024)
    for start in range(0, count, 1024):
        tl.store(partials + start + offs, tl.full([1024], PARTIAL_MARK, tl.int64), mask=start + offs < count)


@triton.jit
def _workspace(buffers, rank, dtype: tl.constexpr, byte_offset, ALIGNED: tl.constexpr):
    """Rank ``rank``'s workspace from ``byte_offset`` on, as a pointer to ``dtype``. ``ALIGNED``: the address is a
    multiple of 16 bytes (so loads and stores of rows whose size is one too are vectorised)."""
    address = tl.load(buffers.to(tl.pointer_type(tl.uint64)) + rank)
    pointer = (address + byte_offset).to(tl.pointer_type(dtype))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _slot(peer, rank):
    """Where a rank keeps ``peer``'s rows (peer != rank): its workspace holds world - 1 slots, none for itself."""
    return peer - (peer > rank).to(tl.int32)


@triton.jit
def _unmarked(bits, MARK: tl.constexpr):
    """``bits`` with the empty mark (-0.0) as +0.0: what a rank pushes and sums is never read as empty."""
    return tl.where(bits == MARK, tl.zeros_like(bits), bits)


@triton.jit
def _rank_order_sum(own, first_slot, slot_stride, rank, mask, x_dtype: tl.constexpr, MARK: tl.constexpr,
                    WORLD: tl.constexpr, BLOCK: tl.constexpr, PEERS: tl.constexpr, TAKE_AT_ONCE: tl.constexpr):
    """A row (part)'s partial sums over the ranks, in fp32 in rank order, so that every rank forms the same sum:
    this rank's own at ``own``, each peer's taken from its slot as it lands (slot s at ``first_slot + s *
    slot_stride``)."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    if PEERS * BLOCK <= TAKE_AT_ONCE:  # every peer's part at once
        peers = _take_rows(first_slot, slot_stride, tl.arange(0, PEERS) < WORLD - 1, mask, MARK,
                           PEERS).to(x_dtype, bitcast=True).to(tl.float32)
    for peer in tl.static_range(WORLD):
        if peer == rank:
            total += _unmarked(tl.load(own, mask=mask, other=0), MARK).to(x_dtype, bitcast=True).to(tl.float32)
        elif PEERS * BLOCK <= TAKE_AT_ONCE:
            total += _row_of(peers, _slot(peer, rank), PEERS)
        else:
            bits = _take(first_slot + _slot(peer, rank).to(tl.int64) * slot_stride, mask, MARK, BLOCK)
            total += bits.to(x_dtype, bitcast=True).to(tl.float32)
    return total


@triton.jit
def _own_pad(pads, rank):
    return tl.load(pads.to(tl.pointer_type(tl.uint64)) + rank).to(tl.pointer_type(tl.int32))


@triton.jit
def _advance(own_pad, COUNTER, call, programs):
    """The last program out advances the call counter (every program has read it by then); whether this one was
    the last."""
    tl.debug_barrier()
    arrived = tl.atomic_add(own_pad + COUNTER + 1, 1, sem="acq_rel", scope="gpu")
    last = arrived == programs - 1
    if last:
        tl.store(own_pad + COUNTER + 1, 0)
        tl.store(own_pad + COUNTER, call + 1)
    return last


@triton.jit
def _new_residual(total, r, x_dtype: tl.constexpr):
    """A row's new residual: its fp32 sum rounded once, plus the old residual ``r``."""
    return (total.to(x_dtype).to(tl.float32) + r.to(tl.float32)).to(x_dtype)


@triton.jit
def _output(v, squares, w, inverse, inv_width, eps, QUANT: tl.constexpr, FP8_MAX_C: tl.constexpr):
    """The normalised row (part) of new residual ``v``, whose row's sum of squares is given (its FP8 codes with
    ``QUANT``)."""
    y = (normalized_by(v, squares, inv_width, eps).to(tl.float32) * w.to(tl.float32)).to(v.dtype)
    if QUANT:
        y = fp8_codes(y.to(tl.float32), inverse, FP8_MAX_C)
    return y


@triton.jit(do_not_specialize=["rank"])  # one compiled kernel for every rank (rank 1 would become a constant)
def _one_shot_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, scale_ptr, buffers, pads, rank, M, H, eps, inv_width_bits, HALF_BYTES, SLOTS,
    COUNTER,
    WORLD: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr, ALIGNED: tl.constexpr,
    PHASE_FIRST: tl.constexpr, PHASE_LAST: tl.constexpr, SYNC: tl.constexpr, FP8_MAX_C: tl.constexpr,
    BITS: tl.constexpr, MARK: tl.constexpr, PARTIAL_MARK: tl.constexpr, PEERS: tl.constexpr,
    TAKE_AT_ONCE: tl.constexpr, PAIRED: tl.constexpr,
):
    pid = tl.program_id(0)
    inv_width = inv_width_bits.to(tl.float64, bitcast=True)
    programs = tl.num_programs(0)
    first_row, row_programs, part = pid // SPLIT, programs // SPLIT, pid % SPLIT
    offs = part * BLOCK + tl.arange(0, BLOCK)  # this program's part of each of its rows
    mask = offs < H
    x_dtype = x_ptr.dtype.element_ty
    x_bits = x_ptr.to(tl.pointer_type(BITS))
    half = 0
    if SYNC:
        own_pad = _own_pad(pads, rank)
        call = tl.load(own_pad + COUNTER, volatile=True)
        half = call & 1
    base = half * HALF_BYTES
    partials = _workspace(buffers, rank, tl.int64, base, False)  # [M, SPLIT] sums of squares, as int64 bits

    if PHASE_FIRST <= 0 and PHASE_LAST >= 0:  # push this rank's partial rows into every peer's slot
        for i in range(first_row, M, row_programs):
            row = tl.cast(i, tl.int64)
            bits = _unmarked(tl.load(x_bits + row * H + offs, mask=mask), MARK)
            for peer in tl.static_range(WORLD):
                if peer != rank:
                    slots = _workspace(buffers, peer, BITS, base + SLOTS, ALIGNED)
                    tl.store(slots + (_slot(rank, peer) * M + row) * H + offs, bits, mask=mask)

    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    inverse = 1.0
    if QUANT:
        inverse = reciprocal(tl.load(scale_ptr))
    if PHASE_FIRST <= 1 and PHASE_LAST >= 1:  # reduce every row as its partial rows land, add (and normalise)
        mine = _workspace(buffers, rank, BITS, base + SLOTS, ALIGNED)
        for i in range(first_row, M, row_programs):
            row = tl.cast(i, tl.int64)
            r = tl.load(res_ptr + row * H + offs, mask=mask, other=0.0)
            total = _rank_order_sum(x_bits + row * H + offs, mine + row * H + offs, tl.cast(M, tl.int64) * H, rank,
                                    mask, x_dtype, MARK, WORLD, BLOCK, PEERS, TAKE_AT_ONCE)
            v = _new_residual(total, r, x_dtype)
            tl.store(res_ptr + row * H + offs, v, mask=mask)
            if SPLIT == 1:
                tl.store(out_ptr + row * H + offs, _output(v, sum_of_squares(v, PAIRED), w, inverse, inv_width, eps,
                                                           QUANT, FP8_MAX_C), mask=mask)
            else:  # this part's sum of squares, for the row's other programs (abs: a NaN's sign never marks it)
                tl.store(partials + row * SPLIT + part, tl.abs(sum_of_squares(v, PAIRED)).to(tl.int64, bitcast=True))

    if SPLIT > 1 and PHASE_FIRST <= 2 and PHASE_LAST >= 2:  # normalise this part once the row's parts are in
        tl.debug_barrier()  # this program's residual stores before its loads of them
        for i in range(first_row, M, row_programs):
            row = tl.cast(i, tl.int64)
            v = tl.load(res_ptr + row * H + offs, mask=mask, other=0.0)
            total = _landed_sum(partials + row * SPLIT, SPLIT)
            tl.store(out_ptr + row * H + offs, _output(v, total, w, inverse, inv_width, eps, QUANT, FP8_MAX_C),
                     mask=mask)
    if SYNC:
        last = _advance(own_pad, COUNTER, call, programs)
        if SPLIT > 1 and last:
            _clear_partials(partials, M * SPLIT, PARTIAL_MARK)
    elif SPLIT > 1 and PHASE_FIRST <= 3 and PHASE_LAST >= 3 and pid == 0:
        _clear_partials(partials, M * SPLIT, PARTIAL_MARK)


@triton.jit(do_not_specialize=["rank"])
def _two_shot_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, scale_ptr, buffers, pads, rank, M, H, eps, inv_width_bits, HALF_BYTES, SLOTS,
    GATHER, COUNTER,
    WORLD: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr, ALIGNED: tl.constexpr,
    PHASE_FIRST: tl.constexpr, PHASE_LAST: tl.constexpr, SYNC: tl.constexpr, FP8_MAX_C: tl.constexpr,
    BITS: tl.constexpr, MARK: tl.constexpr, PARTIAL_MARK: tl.constexpr, PEERS: tl.constexpr,
    TAKE_AT_ONCE: tl.constexpr, PAIRED: tl.constexpr,
):
    pid = tl.program_id(0)
    inv_width = inv_width_bits.to(tl.float64, bitcast=True)
    programs = tl.num_programs(0)
    first, row_programs, part = pid // SPLIT, programs // SPLIT, pid % SPLIT  # rows i of every rank's shard
    offs = part * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H
    x_dtype = x_ptr.dtype.element_ty
    x_bits = x_ptr.to(tl.pointer_type(BITS))
    shard = tl.cdiv(M, WORLD)  # rows per rank
    own_first = rank * shard
    half = 0
    if SYNC:
        own_pad = _own_pad(pads, rank)
        call = tl.load(own_pad + COUNTER, volatile=True)
        half = call & 1
    base = half * HALF_BYTES
    partials = _workspace(buffers, rank, tl.int64, base, False)  # [M, SPLIT] sums of squares, as int64 bits

    if PHASE_FIRST <= 0 and PHASE_LAST >= 0:  # push the rows each peer owns into that peer's slots
        for i in range(first, shard, row_programs):
            for owner in tl.static_range(WORLD):
                row = (owner * shard + i).to(tl.int64)
                if (owner != rank) & (row < M):
                    bits = _unmarked(tl.load(x_bits + row * H + offs, mask=mask), MARK)
                    slots = _workspace(buffers, owner, BITS, base + SLOTS, ALIGNED)
                    tl.store(slots + (_slot(rank, owner) * shard + i).to(tl.int64) * H + offs, bits, mask=mask)

    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    inverse = 1.0
    if QUANT:
        inverse = reciprocal(tl.load(scale_ptr))
    if PHASE_FIRST <= 1 and PHASE_LAST >= 1:  # reduce this rank's rows as they land, add; send them out
        mine = _workspace(buffers, rank, BITS, base + SLOTS, ALIGNED)
        for i in range(first, shard, row_programs):
            row = (own_first + i).to(tl.int64)
            if row < M:
                r = tl.load(res_ptr + row * H + offs, mask=mask, other=0.0)
                total = _rank_order_sum(x_bits + row * H + offs, mine + tl.cast(i, tl.int64) * H + offs,
                                        tl.cast(shard, tl.int64) * H, rank, mask, x_dtype, MARK, WORLD, BLOCK, PEERS,
                                        TAKE_AT_ONCE)
                bits = _unmarked(_new_residual(total, r, x_dtype).to(BITS, bitcast=True), MARK)  # the same bits
                v = bits.to(x_dtype, bitcast=True)
                tl.store(res_ptr + row * H + offs, v, mask=mask)
                for peer in tl.static_range(WORLD):  # the new residual row into every peer's gather area
                    if peer != rank:
                        tl.store(_workspace(buffers, peer, BITS, base + GATHER, ALIGNED) + row * H + offs, bits,
                                 mask=mask)
                if SPLIT == 1:
                    tl.store(out_ptr + row * H + offs, _output(v, sum_of_squares(v, PAIRED), w, inverse, inv_width,
                                                               eps, QUANT, FP8_MAX_C), mask=mask)
                else:  # this part's sum of squares, for the row's programs on every rank
                    squares = tl.abs(sum_of_squares(v, PAIRED)).to(tl.int64, bitcast=True)
                    for peer in tl.static_range(WORLD):
                        tl.store(_workspace(buffers, peer, tl.int64, base, False) + row * SPLIT + part, squares)

    if PHASE_FIRST <= 2 and PHASE_LAST >= 2:  # normalise: this rank's rows once their parts are in, then the others'
        if SPLIT > 1:
            tl.debug_barrier()  # this program's residual stores before its loads of them
            for i in range(first, shard, row_programs):
                row = (own_first + i).to(tl.int64)
                if row < M:
                    v = tl.load(res_ptr + row * H + offs, mask=mask, other=0.0)
                    tl.store(out_ptr + row * H + offs, _output(v, _landed_sum(partials + row * SPLIT, SPLIT), w,
                                                               inverse, inv_width, eps, QUANT, FP8_MAX_C), mask=mask)
        gathered = _workspace(buffers, rank, BITS, base + GATHER, ALIGNED)
        for i in range(first, shard, row_programs):
            for owner in tl.static_range(WORLD):
                row = (owner * shard + i).to(tl.int64)
                if (owner != rank) & (row < M):
                    v = _take(gathered + row * H + offs, mask, MARK, BLOCK).to(x_dtype, bitcast=True)
                    tl.store(res_ptr + row * H + offs, v, mask=mask)
                    if SPLIT == 1:
                        squares = sum_of_squares(v, PAIRED)
                    else:
                        squares = _landed_sum(partials + row * SPLIT, SPLIT)
                    tl.store(out_ptr + row * H + offs,
                             _output(v, squares, w, inverse, inv_width, eps, QUANT, FP8_MAX_C), mask=mask)
    if SYNC:
        last = _advance(own_pad, COUNTER, call, programs)
        if SPLIT > 1 and last:
            _clear_partials(partials, M * SPLIT, PARTIAL_MARK)
    elif SPLIT > 1 and PHASE_FIRST <= 3 and PHASE_LAST >= 3 and pid == 0:
        _clear_partials(partials, M * SPLIT, PARTIAL_MARK)


def _half_layout(num_rows: int, hidden: int, dtype: torch.dtype, two_shot: bool, world: int) -> tuple[int, int, int]:
    """One half of a rank's workspace, in bytes: (where the peers' slots start, where the two-shot gather area
    starts, the end). A half starts with the partials area (``MAX_SPLIT`` sums of squares per row, for a split
    row's programs); then come world - 1 slots of the peers' partial rows (two-shot: of the rows the rank owns); a
    two-shot half then holds the gather area (every row's new residual, from its owner)."""
    slots = num_rows * MAX_SPLIT * 8
    slot_rows = -(-num_rows // world) if two_shot else num_rows
    gather = slots + (world - 1) * slot_rows * hidden * dtype.itemsize
    return slots, gather, gather + (num_rows * hidden * dtype.itemsize if two_shot else 0)


def workspace_bytes(num_rows: int, hidden: int, dtype: torch.dtype, two_shot: bool, world: int) -> int:
    """What one half of a rank's workspace must hold (see ``_half_layout``)."""
    return _half_layout(num_rows, hidden, dtype, two_shot, world)[2]


def counter_index(signal_pad_bytes: int) -> int:
    """Where the call counter sits in a signal pad (int32 index; the arrival count follows it)."""
    return signal_pad_bytes // 4 - 2


def most_programs(device: torch.device) -> int:
    """At most one program per multiprocessor: every program of a launch resident at once. The interpreter runs at
    most 4."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_split(num_rows: int, hidden: int, most: int) -> int:
    """How many programs share a row: the most (a power of two, at most ``MAX_SPLIT``) that leaves every program
    ``MIN_PART`` elements or more and every row's programs resident at once. ``num_rows``: the rows a program
    reduces (the two-shot's: a rank's shard)."""
    split = 1
    while (split * 2 <= MAX_SPLIT and num_rows * split * 2 <= most
           and triton.next_power_of_2(hidden) // (split * 2) >= MIN_PART):
        split *= 2
    return split


def launch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, scale: torch.Tensor | None,
           out: torch.Tensor, buffers, pads, rank: int, world: int, two_shot: bool,
           phases: tuple[int, int] = (PHASE_COPY, PHASE_CLEAR), sync: bool = True, half_bytes: int = 0,
           signal_pad_bytes: int = 0, split: int | None = None) -> torch.Tensor:
    """Run the kernel on contiguous [M, H] ``x`` (this rank's partial sums), ``residual`` (updated in place) and
    ``out`` (the norm, or its FP8 codes with ``scale``). ``buffers`` / ``pads``: every rank's workspace / signal
    pad address, as the device address of an array of them (torch's ``buffer_ptrs_dev``) or an int64 tensor; a
    workspace starts empty-marked for x's dtype (``mark_empty``) and is left so. ``half_bytes``: the offset of the
    workspace's second half (``sync`` only: the interpreter uses the first). ``split``: the programs per row
    (``row_split``'s choice by default, over the rows a program reduces)."""
    num_rows, hidden = x.shape
    quant = scale is not None
    block = max(16, triton.next_power_of_2(hidden))
    most = most_programs(x.device)
    pads = pads if pads is not None else buffers
    slots, gather, _ = _half_layout(num_rows, hidden, x.dtype, two_shot, world)
    reduced_rows = -(-num_rows // world) if two_shot else num_rows  # the rows one rank reduces
    split = split or row_split(reduced_rows, hidden, most)
    if split & (split - 1) or not 1 <= split <= min(MAX_SPLIT, block):
        raise ValueError(f"split must be a power of two from 1 to {min(MAX_SPLIT, block)}, not {split}")
    programs = max(1, min(reduced_rows, most // split)) * split  # split programs per row
    _, bits, mark = _empty_mark(x.dtype)
    paired = squares_paired(hidden, x.dtype)
    if paired and (block // split) % SQUARE_GROUP:
        raise ValueError(f"split {split} leaves parts of {block // split} columns: a part must hold whole groups of "
                         f"{SQUARE_GROUP} squares")
    common = dict(WORLD=world, QUANT=quant, ALIGNED=hidden % 8 == 0 and half_bytes % 16 == 0, BLOCK=block // split,
                  SPLIT=split, PHASE_FIRST=phases[0], PHASE_LAST=phases[1], SYNC=sync, FP8_MAX_C=FP8_MAX, BITS=bits,
                  MARK=mark, PARTIAL_MARK=_partial_mark(x.dtype), num_warps=_part_warps(block // split),
                  PEERS=triton.next_power_of_2(max(1, world - 1)),
                  TAKE_AT_ONCE=TAKE_AT_ONCE if world > 2 and not two_shot else 0, PAIRED=paired)
    args = (x, residual, weight, out, scale if quant else x, buffers, pads, rank, num_rows, hidden, eps,
            inverse_width_bits(hidden), half_bytes, slots)
    counter = counter_index(signal_pad_bytes)
    if two_shot:
        _two_shot_kernel[(programs,)](*args, gather, counter, **common)
    else:
        _one_shot_kernel[(programs,)](*args, counter, **common)
    return out


def allreduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           scale: torch.Tensor | None, group_name: str, two_shot: bool) -> torch.Tensor:
    """The fused op on a CUDA process group: this rank's result, its residual updated in place."""
    x = x.contiguous()
    num_rows, hidden = x.shape
    quant = scale is not None
    world = group_size(group_name)
    nbytes = 2 * workspace_bytes(num_rows, hidden, x.dtype, two_shot, world)
    form = "two-shot" if two_shot else "one-shot"  # each its own workspace, empty-marked for x's dtype
    space = symm_mem.workspace(group_name, f"fused all-reduce + norm, {form}, {x.dtype}", nbytes,
                               prepare=lambda buffer: mark_empty(buffer, x.dtype))
    handle = space.handle
    res = residual if residual.is_contiguous() else residual.contiguous()
    out = torch.empty((num_rows, hidden), dtype=FP8_DTYPE if quant else x.dtype, device=x.device)
    launch(x, res, weight, eps, scale, out, handle.buffer_ptrs_dev, handle.signal_pad_ptrs_dev, handle.rank,
           handle.world_size, two_shot, half_bytes=space.nbytes // 2, signal_pad_bytes=handle.signal_pad_size)
    if res is not residual:
        residual.copy_(res)
    return out
