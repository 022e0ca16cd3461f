"""Where does a forward's latency differ between two instances of the same config? (issue 19; on one GPU)

The paired rounds of a sweep take drift out of a speedup, but two instances of all-off (the A/A pair) or of one
config in two runs still differed by 1-4% at 1-64 tokens on an H200, far outside their rounds' intervals. This
times, in shared shuffled rounds in one process, the all-off forward of the Llama-3.1-8B shape (8 layers, FP8
static): several CUDA-graph captures of one compile, and captures of separate compiles (Inductor's caches off, so
each compiles and autotunes afresh). A spread between captures of one compile points at memory placement; a spread
between compiles alone, at what each compile chose.

    python3 scripts/probe_instances.py [--tokens 1 8 64] [--captures 3] [--compiles 3] [--rounds 12]
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch

from fusiontune.harness.jobs import Job
from fusiontune.harness.presets import build_model_config
from fusiontune.harness.timing import INPUT_COPIES, GraphTimer
from fusiontune.harness.worker import TPWorker

OFF = {"fuse_norm_quant": False, "fuse_act_quant": False, "fuse_rope_kvcache": False, "fuse_attn_quant": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--captures", type=int, default=3)
    parser.add_argument("--compiles", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 64
    torch._inductor.config.autotune_local_cache = False  # each compile benchmarks its kernels' configs afresh
    cfg = build_model_config(preset="llama-3.1-8b", quant="fp8-static", num_layers=8, max_position=16384)
    worker = TPWorker(0, 1, None, "cuda")
    job = Job("off", OFF, 2, cfg.to_dict(), sorted(args.tokens, reverse=True), compile_cache=False)
    compiles = []
    for _ in range(args.compiles):  # each a fresh compile of the same config (no cache): its own kernel choices
        config = worker._prepared(job)
        assert not config.failed, config.failed
        compiles.append(config)
    print(f"{torch.cuda.get_device_name()}; {args.compiles} compiles of all-off, {args.captures} captures of the "
          f"first; rounds of 5 replays each, {args.rounds} rounds, order shuffled per round")
    order = random.Random(0)
    for num_tokens in sorted(args.tokens):
        x = worker.inputs(cfg, num_tokens, seed=0)
        copies = [x] + [x.clone() for _ in range(INPUT_COPIES - 1)]
        timers = {}
        for k, config in enumerate(compiles):
            fn, _ = config.compiled[next(iter(config.compiled))]
            for _ in range(3):
                fn(x)
            for c in range(args.captures if k == 0 else 1):
                timers[f"compile {k} capture {c}"] = GraphTimer(fn, copies)
        for timer in timers.values():
            timer.warm()
        samples = {name: [] for name in timers}
        for _ in range(args.rounds):
            for name in order.sample(list(timers), len(timers)):
                samples[name].append(statistics.median(timers[name].sample(5)))
        reference = statistics.median(samples["compile 0 capture 0"])
        print(f"num_tokens={num_tokens}:")
        for name, values in samples.items():
            ratios = sorted(v / reference for v in values)
            print(f"  {name}: median {statistics.median(values):.4f} us/forward ... ratio to compile 0 capture 0 "
                  f"{statistics.median(ratios):.4f} (rounds {ratios[0]:.4f}-{ratios[-1]:.4f})")
        del timers


if __name__ == "__main__":
    with torch.no_grad():
        main()
