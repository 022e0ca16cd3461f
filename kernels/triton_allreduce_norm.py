"""All-reduce -> residual add -> RMSNorm (-> FP8 static quant) in one Triton kernel over symmetric memory.

Each rank's kernel reads its peers' partial sums straight out of their workspaces (the peer pointers torch's
symmetric memory hands out), so the reduction, the residual update, the norm and the quant happen where the sum
is formed: no all-reduced tensor is written and read back, and there is one launch instead of two.

- **One-shot** (small tensors): every rank copies its partial rows into its workspace; the ranks meet; every
  rank sums every row over all ranks, adds the residual, normalises and quantises it.
- **Two-shot** (larger tensors): rank r owns rows [r S, (r + 1) S), S = ceil(M / world). After the copy and a
  meeting, each rank reduces, normalises and quantises only its own rows and also writes the results (new residual
  rows and output rows) to its workspace; after a second meeting every rank copies the other ranks' rows from
  theirs. Each rank reads the tensor once instead of world times.

Numerics are ``numerics``' (``all_reduce_sum``, ``residual_add``, ``rms_norm``, ``quant_fp8_static``): the sum is
taken in fp32 in rank order and rounded once, so every rank holds the same bits, and one-shot and two-shot agree.

**Meetings.** Program p of a rank meets program p of every rank (``_meet``): it stores a number into a flag of
each peer's signal pad (slot p x world + rank, a release store at system scope, which does not wait for an
answer) and spins until its own flags from every peer hold at least that number (acquire loads). The numbers
grow by two per call and are kept per program in the pad itself, so nothing is reset and a captured CUDA graph
replays as it is. Writes before a meeting are visible to the peers' same program after it. The grid is always
the same (one program per multiprocessor, every one resident at once, every one meeting even with no rows), and
program p handles the same rows on every rank, so meeting program for program is enough.

**No closing meeting.** Calls alternate between the two halves of the workspace (the counter's parity, the same
for every program). Before a rank writes a half again, two calls later, it has met its peers in the call between,
so they have finished the call that read that half: one meeting per one-shot call, two per two-shot call.

``PHASE_FIRST`` / ``PHASE_LAST`` select which phases (0 copy, 1 reduce, 2 gather) a launch runs and ``SYNC``
whether the ranks meet: on GPUs one launch runs all of them; tests on CPU run each phase for every simulated rank
in turn in Triton's interpreter, one process holding every rank's workspace (and only its first half).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import symm_mem
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
def _allreduce_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, scale_ptr, buffers, pads,
    rank, M, H, eps, RES_BYTES, OUT_BYTES, HALF_BYTES, COUNTERS,
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
    if SYNC:  # this program's meeting numbers, and which half of the workspace this call uses
        table = pads.to(tl.pointer_type(tl.uint64))
        peers = tl.arange(0, WORLD)
        own_pad = tl.load(table + rank).to(tl.pointer_type(tl.int32))
        send = tl.load(table + peers).to(tl.pointer_type(tl.int32)) + pid * WORLD + rank
        receive = own_pad + pid * WORLD + peers
        counter = own_pad + COUNTERS + pid
        number = tl.load(counter)
        half = (number >> 1) & 1
    base = half * HALF_BYTES
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    if QUANT:
        inverse = reciprocal(tl.load(scale_ptr))

    if PHASE_FIRST <= 0 and PHASE_LAST >= 0:  # copy this rank's partial rows into its workspace
        staged = _workspace(buffers, rank, x_dtype, base, ALIGNED)
        for i in range(pid, shard, programs):
            for owner in tl.static_range(WORLD if TWO_SHOT else 1):
                row = (owner * shard + i).to(tl.int64)
                if row < M:
                    values = tl.load(x_ptr + row * H + offs, mask=mask)
                    tl.store(staged + row * H + offs, values, mask=mask)
        if SYNC:
            _meet(send, receive, number + 1, WORLD)

    if PHASE_FIRST <= 1 and PHASE_LAST >= 1:  # reduce this rank's rows, add, normalise, quantise
        for i in range(pid, shard, programs):
            row = (own_first + i).to(tl.int64)
            if row < M:
                r = tl.load(res_ptr + row * H + offs, mask=mask, other=0.0)
                total = tl.zeros([BLOCK], dtype=tl.float32)
                for peer in tl.static_range(WORLD):  # rank order: every rank forms the same sum
                    partial = _workspace(buffers, peer, x_dtype, base, ALIGNED)
                    total += tl.load(partial + row * H + offs, mask=mask, other=0.0, cache_modifier=".cg").to(
                        tl.float32)
                v = (total.to(x_dtype).to(tl.float32) + r.to(tl.float32)).to(x_dtype)
                tl.store(res_ptr + row * H + offs, v, mask=mask)
                y = (rms_normalized(v, H, eps).to(tl.float32) * w.to(tl.float32)).to(x_dtype)
                if QUANT:
                    y = fp8_codes(y.to(tl.float32), inverse, FP8_MAX_C)
                tl.store(out_ptr + row * H + offs, y, mask=mask)
                if TWO_SHOT:  # for the peers to gather
                    tl.store(_workspace(buffers, rank, x_dtype, base + RES_BYTES, ALIGNED) + row * H + offs, v,
                             mask=mask)
                    tl.store(_workspace(buffers, rank, out_dtype, base + OUT_BYTES, ALIGNED) + row * H + offs, y,
                             mask=mask)
        if SYNC and TWO_SHOT:
            _meet(send, receive, number + 2, WORLD)

    if TWO_SHOT and PHASE_FIRST <= 2 and PHASE_LAST >= 2:  # gather every other rank's rows
        for i in range(pid, shard, programs):
            for owner in tl.static_range(WORLD):
                row = (owner * shard + i).to(tl.int64)
                if (owner != rank) & (row < M):
                    v = tl.load(_workspace(buffers, owner, x_dtype, base + RES_BYTES, ALIGNED) + row * H + offs,
                                mask=mask, cache_modifier=".cg")
                    tl.store(res_ptr + row * H + offs, v, mask=mask)
                    y = tl.load(_workspace(buffers, owner, out_dtype, base + OUT_BYTES, ALIGNED) + row * H + offs,
                                mask=mask, cache_modifier=".cg")
                    tl.store(out_ptr + row * H + offs, y, mask=mask)
    if SYNC:
        tl.store(counter, number + 2)


def workspace_bytes(num_rows: int, hidden: int, dtype: torch.dtype, quant: bool, two_shot: bool) -> int:
    """What one rank's workspace must hold: the partial rows, and for two-shot the new residual and output rows."""
    elements = num_rows * hidden
    if not two_shot:
        return elements * dtype.itemsize
    return elements * (2 * dtype.itemsize + (1 if quant else dtype.itemsize))


def programs_for(num_rows: int, world: int, two_shot: bool, device: torch.device, signal_pad_bytes: int = 0) -> int:
    """On GPUs the same grid for every call on a workspace: one program per multiprocessor (every program resident
    at once), as many as the signal pad holds flags and a counter for (one without a pad: a launch that does not
    meet). The interpreter runs one per row, at most 4."""
    if device.type == "cuda":
        slots = signal_pad_bytes // 4 // (world + 1)
        return max(1, min(torch.cuda.get_device_properties(device).multi_processor_count, slots))
    rows = -(-num_rows // world) if two_shot else num_rows
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
    elements = num_rows * hidden
    block = max(16, triton.next_power_of_2(hidden))
    programs = programs_for(num_rows, world, two_shot, x.device, signal_pad_bytes)
    _allreduce_norm_kernel[(programs,)](
        x, residual, weight, out, scale if quant else x, buffers, pads if pads is not None else buffers,
        rank, num_rows, hidden, eps, elements * x.element_size(), 2 * elements * x.element_size(), half_bytes,
        programs * world,
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
    space = symm_mem.workspace(group_name, "fused all-reduce + norm",
                               2 * workspace_bytes(num_rows, hidden, x.dtype, quant, two_shot))
    handle = space.handle
    res = residual if residual.is_contiguous() else residual.contiguous()
    out = torch.empty((num_rows, hidden), dtype=FP8_DTYPE if quant else x.dtype, device=x.device)
    launch(x, res, weight, eps, scale, out, handle.buffer_ptrs_dev, handle.signal_pad_ptrs_dev, handle.rank,
           handle.world_size, two_shot, half_bytes=space.nbytes // 2, signal_pad_bytes=handle.signal_pad_size)
    if res is not residual:
        residual.copy_(res)
    return out
