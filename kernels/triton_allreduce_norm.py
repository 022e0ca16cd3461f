"""All-reduce -> residual add -> RMSNorm (-> FP8 static quant) in one Triton kernel over symmetric memory.

Each rank's kernel pushes its partial sums straight into its peers' workspaces (the peer pointers torch's
symmetric memory hands out) and reduces what its peers pushed into its own, so the reduction, the residual update,
the norm and the quant happen where the sum is formed: no all-reduced tensor is written and read back, and there is
one launch instead of two. Every transfer between GPUs is a store (NVLink writes are posted; a read would wait a
round trip), and every read of the sum is local.

- **One-shot** (small tensors): every rank stores its partial rows into a slot of every peer's workspace; the
  ranks meet; every rank sums every row over its own partial rows and the slots, in rank order, adds the
  residual, normalises and quantises it.
- **Two-shot** (larger tensors): rank r owns rows [r S, (r + 1) S), S = ceil(M / world). Each rank stores the
  rows each peer owns into that peer's slots; after a meeting each rank reduces, normalises and quantises only its
  own rows and stores the results (new residual rows and output rows) into every peer's gather area; after a
  second meeting every rank copies the other ranks' rows out of its own gather area. Each rank sends the tensor
  once instead of world - 1 times.

Numerics are ``numerics``' (``all_reduce_sum``, ``residual_add``, ``rms_norm``, ``quant_fp8_static``): the sum is
taken in fp32 in rank order and rounded once, so every rank holds the same bits, and one-shot and two-shot agree.

**Meetings.** Program p of a rank meets program p of every rank (``_meet``): it stores a number into a flag of
each peer's signal pad (slot p x world + rank, a release store at system scope, which does not wait for an
answer) and spins until its own flags from every peer hold at least that number (acquire loads). The numbers come
from a call counter kept in the pad itself (two per call, so they only grow), so nothing is reset and a captured
CUDA graph replays as it is. Stores before a meeting are visible to the peers' same program after it. Every
program of a launch is resident at once (at most one per multiprocessor), every rank launches the same grid for
the same tensor, and program p handles the same rows on every rank, so meeting program for program is enough;
the grid is as small as the rows allow (one program for a one-token decode step).

**The call counter.** Every program reads it first; the last program to finish (an arrival count, acq_rel
atomics) advances it, so the next call on this rank reads the next value whatever its grid.

**No closing meeting.** Calls alternate between the two halves of the workspace (the counter's parity). Before a
rank writes into a peer's half again, two calls later, it has met that peer in the call between, so the peer has
finished the call that read that half: one meeting per one-shot call, two per two-shot call.

``PHASE_FIRST`` / ``PHASE_LAST`` select which phases (0 push, 1 reduce, 2 gather) a launch runs and ``SYNC``
whether the ranks meet: on GPUs one launch runs all of them; tests on CPU run each phase for every simulated rank
in turn in Triton's interpreter, one process holding every rank's workspace (and only its first half).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import symm_mem
from .collectives import group_size
from .numerics import FP8_DTYPE, FP8_MAX
from .triton_rows import _warps, fp8_codes, reciprocal, rms_normalized

PHASE_COPY, PHASE_REDUCE, PHASE_GATHER = 0, 1, 2


@triton.jit
def _store_release(pointers, values):
    """``*pointers = values``, released at system scope (threads holding the same element store the same value)."""
    return tl.inline_asm_elementwise("st.release.sys.global.b32 [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                                     [pointers, values], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _load_acquire(pointers):
    return tl.inline_asm_elementwise("ld.acquire.sys.global.b32 $0, [$1];", "=r,l", [pointers], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _meet(send, receive, number, WORLD: tl.constexpr):
    """Tell every peer's same program ``number`` (``send``: its flags for us) and wait until every peer has told
    us as much (``receive``: our flags from them); see the module doc."""
    tl.debug_barrier()  # every thread's writes come before the release below
    _store_release(send, tl.full([WORLD], 0, tl.int32) + number)
    while tl.min(_load_acquire(receive) - number) < 0:  # wraps safely: numbers only grow
        pass
    tl.debug_barrier()  # and every thread's reads after it


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


@triton.jit(do_not_specialize=["rank"])  # one compiled kernel for every rank (rank 1 would become a constant)
def _allreduce_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, scale_ptr, buffers, pads,
    rank, M, H, eps, GATHER_RES, GATHER_OUT, HALF_BYTES, COUNTER,
    WORLD: tl.constexpr, TWO_SHOT: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    PHASE_FIRST: tl.constexpr, PHASE_LAST: tl.constexpr, SYNC: tl.constexpr, FP8_MAX_C: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x_dtype = x_ptr.dtype.element_ty
    out_dtype = out_ptr.dtype.element_ty
    if TWO_SHOT:
        shard = tl.cdiv(M, WORLD)  # rows per rank
        own_first = rank * shard
    else:
        shard = M
        own_first = 0
    half = 0
    if SYNC:  # this call's number (from the pad's call counter) and the workspace half it uses
        table = pads.to(tl.pointer_type(tl.uint64))
        peers = tl.arange(0, WORLD)
        own_pad = tl.load(table + rank).to(tl.pointer_type(tl.int32))
        send = tl.load(table + peers).to(tl.pointer_type(tl.int32)) + pid * WORLD + rank
        receive = own_pad + pid * WORLD + peers
        call = tl.load(own_pad + COUNTER, volatile=True)
        half = call & 1
        number = 2 * call
    base = half * HALF_BYTES
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    if QUANT:
        inverse = reciprocal(tl.load(scale_ptr))

    if PHASE_FIRST <= 0 and PHASE_LAST >= 0:  # push this rank's partial rows into the peers' slots
        for i in range(pid, shard, programs):
            for owner in tl.static_range(WORLD if TWO_SHOT else 1):
                row = (owner * shard + i).to(tl.int64)
                if row < M:
                    if TWO_SHOT:
                        if owner != rank:
                            values = tl.load(x_ptr + row * H + offs, mask=mask)
                            slots = _workspace(buffers, owner, x_dtype, base, ALIGNED)
                            tl.store(slots + (_slot(rank, owner) * shard + i).to(tl.int64) * H + offs, values,
                                     mask=mask)
                    else:
                        values = tl.load(x_ptr + row * H + offs, mask=mask)
                        for peer in tl.static_range(WORLD):
                            if peer != rank:
                                slots = _workspace(buffers, peer, x_dtype, base, ALIGNED)
                                tl.store(slots + (_slot(rank, peer) * shard + row) * H + offs, values, mask=mask)
        if SYNC:
            _meet(send, receive, number + 1, WORLD)

    if PHASE_FIRST <= 1 and PHASE_LAST >= 1:  # reduce this rank's rows, add, normalise, quantise
        mine = _workspace(buffers, rank, x_dtype, base, ALIGNED)
        for i in range(pid, shard, programs):
            row = (own_first + i).to(tl.int64)
            if row < M:
                r = tl.load(res_ptr + row * H + offs, mask=mask, other=0.0)
                total = tl.zeros([BLOCK], dtype=tl.float32)
                for peer in tl.static_range(WORLD):  # rank order: every rank forms the same sum
                    if peer == rank:
                        partial = tl.load(x_ptr + row * H + offs, mask=mask, other=0.0)
                    else:
                        partial = tl.load(mine + (_slot(peer, rank) * shard + i).to(tl.int64) * H + offs, mask=mask,
                                          other=0.0, cache_modifier=".cg")
                    total += partial.to(tl.float32)
                v = (total.to(x_dtype).to(tl.float32) + r.to(tl.float32)).to(x_dtype)
                tl.store(res_ptr + row * H + offs, v, mask=mask)
                y = (rms_normalized(v, H, eps).to(tl.float32) * w.to(tl.float32)).to(x_dtype)
                if QUANT:
                    y = fp8_codes(y.to(tl.float32), inverse, FP8_MAX_C)
                tl.store(out_ptr + row * H + offs, y, mask=mask)
                if TWO_SHOT:  # into every peer's gather area
                    for peer in tl.static_range(WORLD):
                        if peer != rank:
                            tl.store(_workspace(buffers, peer, x_dtype, base + GATHER_RES, ALIGNED) + row * H + offs,
                                     v, mask=mask)
                            tl.store(_workspace(buffers, peer, out_dtype, base + GATHER_OUT, ALIGNED) + row * H
                                     + offs, y, mask=mask)
        if SYNC and TWO_SHOT:
            _meet(send, receive, number + 2, WORLD)

    if TWO_SHOT and PHASE_FIRST <= 2 and PHASE_LAST >= 2:  # copy the other ranks' rows out of the gather area
        gathered_res = _workspace(buffers, rank, x_dtype, base + GATHER_RES, ALIGNED)
        gathered_out = _workspace(buffers, rank, out_dtype, base + GATHER_OUT, ALIGNED)
        for i in range(pid, shard, programs):
            for owner in tl.static_range(WORLD):
                row = (owner * shard + i).to(tl.int64)
                if (owner != rank) & (row < M):
                    v = tl.load(gathered_res + row * H + offs, mask=mask, cache_modifier=".cg")
                    tl.store(res_ptr + row * H + offs, v, mask=mask)
                    y = tl.load(gathered_out + row * H + offs, mask=mask, cache_modifier=".cg")
                    tl.store(out_ptr + row * H + offs, y, mask=mask)
    if SYNC:  # the last program out advances the call counter (every program has read it by then)
        tl.debug_barrier()
        arrived = tl.atomic_add(own_pad + COUNTER + 1, 1, sem="acq_rel", scope="gpu")
        if arrived == programs - 1:
            tl.store(own_pad + COUNTER + 1, 0)
            tl.store(own_pad + COUNTER, call + 1)


def _half_layout(num_rows: int, hidden: int, dtype: torch.dtype, quant: bool, two_shot: bool,
                 world: int) -> tuple[int, int, int]:
    """One half of a rank's workspace, in bytes: (where the two-shot gather area's residual rows start, where its
    output rows start, the end). First come world - 1 slots of the peers' partial rows (two-shot: of the rows the
    rank owns); a two-shot half then holds the gather area (new residual rows, then output rows)."""
    slot_rows = -(-num_rows // world) if two_shot else num_rows
    gather_res = (world - 1) * slot_rows * hidden * dtype.itemsize
    if not two_shot:
        return gather_res, gather_res, gather_res
    gather_out = gather_res + num_rows * hidden * dtype.itemsize
    return gather_res, gather_out, gather_out + num_rows * hidden * (1 if quant else dtype.itemsize)


def workspace_bytes(num_rows: int, hidden: int, dtype: torch.dtype, quant: bool, two_shot: bool,
                    world: int) -> int:
    """What one half of a rank's workspace must hold (see ``_half_layout``)."""
    return _half_layout(num_rows, hidden, dtype, quant, two_shot, world)[2]


def pad_layout(signal_pad_bytes: int, world: int) -> tuple[int, int]:
    """(the most programs the pad holds flags for, the index of its call counter; the arrival count follows)."""
    counter = signal_pad_bytes // 4 - 2
    return counter // world, counter


def programs_for(num_rows: int, world: int, two_shot: bool, device: torch.device, signal_pad_bytes: int = 0) -> int:
    """One program per row a rank handles (two-shot: per row it owns), at most one per multiprocessor (every
    program resident at once) and as many as the signal pad holds flags for. The interpreter runs at most 4."""
    rows = -(-num_rows // world) if two_shot else num_rows
    if device.type == "cuda":
        most = min(torch.cuda.get_device_properties(device).multi_processor_count,
                   pad_layout(signal_pad_bytes, world)[0])
        return max(1, min(rows, most))
    return max(1, min(rows, 4))


def launch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, scale: torch.Tensor | None,
           out: torch.Tensor, buffers, pads, rank: int, world: int, two_shot: bool,
           phases: tuple[int, int] = (PHASE_COPY, PHASE_GATHER), sync: bool = True, half_bytes: int = 0,
           signal_pad_bytes: int = 0) -> torch.Tensor:
    """Run the kernel on contiguous [M, H] ``x`` (this rank's partial sums), ``residual`` (updated in place) and
    ``out`` (the norm, or its FP8 codes with ``scale``). ``buffers`` / ``pads``: every rank's workspace / signal
    pad address, as the device address of an array of them (torch's ``buffer_ptrs_dev``) or an int64 tensor;
    ``half_bytes``: the offset of the workspace's second half (``sync`` only: the interpreter uses the first)."""
    num_rows, hidden = x.shape
    quant = scale is not None
    block = max(16, triton.next_power_of_2(hidden))
    programs = programs_for(num_rows, world, two_shot, x.device, signal_pad_bytes)
    gather_res, gather_out, _ = _half_layout(num_rows, hidden, x.dtype, quant, two_shot, world)
    _allreduce_norm_kernel[(programs,)](
        x, residual, weight, out, scale if quant else x, buffers, pads if pads is not None else buffers,
        rank, num_rows, hidden, eps, gather_res, gather_out, half_bytes, pad_layout(signal_pad_bytes, world)[1],
        WORLD=world, TWO_SHOT=two_shot, QUANT=quant, BLOCK=block, ALIGNED=hidden % 8 == 0 and half_bytes % 16 == 0,
        PHASE_FIRST=phases[0], PHASE_LAST=phases[1], SYNC=sync, FP8_MAX_C=FP8_MAX, num_warps=_warps(block),
    )
    return out


def allreduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           scale: torch.Tensor | None, group_name: str, two_shot: bool) -> torch.Tensor:
    """The fused op on a CUDA process group: this rank's result, its residual updated in place."""
    x = x.contiguous()
    num_rows, hidden = x.shape
    quant = scale is not None
    world = group_size(group_name)
    space = symm_mem.workspace(group_name, "fused all-reduce + norm",
                               2 * workspace_bytes(num_rows, hidden, x.dtype, quant, two_shot, world))
    handle = space.handle
    res = residual if residual.is_contiguous() else residual.contiguous()
    out = torch.empty((num_rows, hidden), dtype=FP8_DTYPE if quant else x.dtype, device=x.device)
    launch(x, res, weight, eps, scale, out, handle.buffer_ptrs_dev, handle.signal_pad_ptrs_dev, handle.rank,
           handle.world_size, two_shot, half_bytes=space.nbytes // 2, signal_pad_bytes=handle.signal_pad_size)
    if res is not residual:
        residual.copy_(res)
    return out
