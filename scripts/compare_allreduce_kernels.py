"""Device probe: the fused all-reduce + norm kernel's variants side by side on one machine (one process per GPU,
the bench-kernels timer), with torch's symmetric-memory one-shot / two-shot + our norm kernel beside them,
FlashInfer's fused kernel where flashinfer-python is installed, and the compiled kernels' registers and spills. An
earlier form of the kernel runs beside the current one where it is saved as scripts/_old_allreduce_norm.py (not
kept in git: ``git show REV:kernels/triton_allreduce_rms.py``, its relative imports made absolute and its
workspace purposes renamed so that the two never share a signal pad). ``SPLITS=1,2,4,8`` adds both forms with
each fixed number of programs per row beside ``row_split``'s choice; ``TOKENS=1,8,64`` narrows the sizes and
``QUANTS=none`` the outputs (default ``none,fp8-static``). Usage
there: python3 scripts/compare_allreduce_kernels.py TP [CSV]"""

from __future__ import annotations

import csv
import importlib.util
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fusiontune.harness import bench_collectives as bench
from fusiontune.kernels.collectives import all_reduced
from fusiontune.harness.timing import slowest_rank, time_per_call
from fusiontune.kernels import flashinfer_allreduce, symm_mem
from fusiontune.kernels import triton_allreduce_rms as new
from fusiontune.kernels.triton_rows import INPUT_ADD_RESIDUAL, run_rows

OLD_PATH = Path(__file__).with_name("_old_allreduce_norm.py")
TOKENS = tuple(int(t) for t in (os.environ.get("TOKENS") or "1,2,8,32,64,256,1024,4096").split(","))
SPLITS = tuple(int(s) for s in os.environ["SPLITS"].split(",")) if os.environ.get("SPLITS") else ()
QUANTS = tuple(None if q == "none" else q for q in (os.environ.get("QUANTS") or "none,fp8-static").split(","))
HIDDEN = (4096, 8192)


def _old():
    if not OLD_PATH.exists():
        return None
    spec = importlib.util.spec_from_file_location("old_allreduce_norm", OLD_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compiled(kernel):
    out = []
    for caches in getattr(kernel, "device_caches", {}).values():
        for compiled in caches[0].values():
            try:
                compiled._init_handles()
                out.append((compiled.n_regs, compiled.n_spills, compiled.metadata.num_warps))
            except Exception:  # noqa: BLE001
                pass
    return out


def main(rank, world, port, csv_path):
    device = bench.join_gpu_group(rank, world, port)
    group = dist.group.WORLD
    name = group.group_name
    old = _old()
    rows_out = []
    for quant in QUANTS:
        def norm(reduced, i, quant=quant):
            extra = {"quant": quant, "scale": i["scale"]} if quant else {}
            return run_rows(reduced, input_mode=INPUT_ADD_RESIDUAL, residual=i["residual"], weight=i["weight"],
                            eps=bench.EPS, **extra)

        peers = {
            "one_shot": lambda i: new.allreduce_add_rms_norm(i["x"], i["residual"], i["weight"], bench.EPS,
                                                                  i["scale"], name, two_shot=False),
            "two_shot": lambda i: new.allreduce_add_rms_norm(i["x"], i["residual"], i["weight"], bench.EPS,
                                                                  i["scale"], name, two_shot=True),
            "nccl_norm": lambda i: norm(all_reduced(i["x"], name), i),
            "one_shot_norm": lambda i: norm(symm_mem.symm_mem_all_reduce(i["x"], name, "one-shot"), i),
            "two_shot_norm": lambda i: norm(symm_mem.symm_mem_all_reduce(i["x"], name, "two-shot"), i),
        }
        rule = new.row_split

        def with_split(split, two_shot):
            def run(i):
                new.row_split = lambda *_: split
                try:
                    return new.allreduce_add_rms_norm(i["x"], i["residual"], i["weight"], bench.EPS, i["scale"], name,
                                                      two_shot=two_shot)
                finally:
                    new.row_split = rule
            return run

        for split in SPLITS:
            peers[f"one_shot_s{split}"] = with_split(split, False)
            peers[f"two_shot_s{split}"] = with_split(split, True)
        if old:
            peers["old_one_shot"] = lambda i: old.allreduce_add_rms_norm(i["x"], i["residual"], i["weight"],
                                                                          bench.EPS, i["scale"], name, two_shot=False)
            peers["old_two_shot"] = lambda i: old.allreduce_add_rms_norm(i["x"], i["residual"], i["weight"],
                                                                          bench.EPS, i["scale"], name, two_shot=True)
        if flashinfer_allreduce.available():
            peers["flashinfer"] = lambda i: flashinfer_allreduce.allreduce_add_rms_norm(
                i["x"], i["residual"], i["weight"], bench.EPS, i["scale"], name)
        for hidden in HIDDEN:
            for tokens in TOKENS:
                sets = bench._input_sets(tokens, hidden)
                inputs = [bench._norm_inputs(tokens, hidden, rank, world, s, quant) for s in range(sets)]
                row = {"tp": world, "quant": quant or "none", "hidden": hidden, "num_tokens": tokens,
                       "mb": round(tokens * hidden * 2 / 2**20, 4)}
                if SPLITS and tokens <= 256:  # every split of a form gives the bits of a whole row in one program
                    for two_shot in (False, True):  # (not across forms: each rank's residual here is its own, and
                        first = None                # the two-shot normalises a row with its owner's)
                        for split in SPLITS:
                            residual = inputs[0]["residual"].clone()
                            out = with_split(split, two_shot)({**inputs[0], "residual": residual})
                            got = (out.view(torch.uint8), residual)
                            first = first or got
                            if not (torch.equal(got[0], first[0]) and torch.equal(got[1], first[1])):
                                print(f"MISMATCH rank {rank} split {split} two_shot {two_shot} {row}", flush=True)
                for peer, fn in peers.items():
                    times = slowest_rank(time_per_call(fn, inputs, replays=30, barrier=group), device, group)
                    deciles = statistics.quantiles(times, n=10, method="inclusive")
                    row[peer] = round(statistics.median(times), 2)
                    row[peer + "_p10"], row[peer + "_p90"] = round(deciles[0], 2), round(deciles[-1], 2)
                rows_out.append(row)
                if rank == 0:
                    print(" ".join(f"{k}={v}" for k, v in row.items() if not k.endswith(("_p10", "_p90"))),
                          flush=True)
                del inputs
                torch.cuda.empty_cache()
    if rank == 0:
        for kernel in (new._one_shot_kernel, new._two_shot_kernel):
            print(f"{kernel.__name__} (regs, spills, warps):", _compiled(kernel))
        if old:
            for name in sorted(n for n in vars(old) if n.endswith("_kernel")):
                print(f"old {name} (regs, spills, warps):", _compiled(getattr(old, name)))
        if csv_path:
            with open(csv_path, "w", newline="") as sink:
                writer = csv.DictWriter(sink, fieldnames=list(rows_out[0]))
                writer.writeheader()
                writer.writerows(rows_out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    from fusiontune.harness.process_group import free_port

    tp = int(sys.argv[1])
    mp.spawn(main, args=(tp, free_port(), sys.argv[2] if len(sys.argv) > 2 else None), nprocs=tp, join=True)
