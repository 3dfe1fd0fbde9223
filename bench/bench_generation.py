"""Generation throughput of the local transformers backend on the embedded model: batched vs one prompt at a time.

Same model, prompts (the real raw_cots prompts with the spec chunk), greedy decoding and token budget for every
setting; tokens/s counts generated tokens only. Prints the curve over batch sizes and the best ratio.
Then the raw_cots call itself (two-phase CoT + answer, n_samples, the default params) with the shared-head KV cache
off vs on: the spec system prompt is the same for every prompt of a category, so it is encoded once instead of per row;
and with the head cache on, transformers' DynamicCache (a full copy of the cache per step) vs the reserved buffers.

    python bench/bench_generation.py [--prompts 16] [--tokens 48] [--batches 1,4,8,16]
"""
from __future__ import annotations

import argparse
import time

from common import ROOT, machine, pipeline_conversations, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batches", default="1,4,8,16")
    args = ap.parse_args()

    from pipelines import catalog
    from pipelines.backends.local import TransformersChatBackend
    from pipelines.params import Sampling, TransformersBackend

    params, convs, prefill = pipeline_conversations(k=args.prompts)
    cfg = TransformersBackend(kind="transformers", model=str(ROOT / catalog.BASE_MODEL), batch_size=1)
    backend = TransformersChatBackend(cfg)
    tok = backend.tok
    # Fixed-length outputs make settings comparable: greedy, and EOS ignored via min_new_tokens.
    sampling = Sampling(temperature=0.0, max_new_tokens=args.tokens)
    backend.model.generation_config.min_new_tokens = args.tokens
    backend.generate(convs[:2], 1, sampling, prefill=prefill, progress=False)  # warm-up
    prompt_tokens = sum(len(tok(backend.render(c, prefill), add_special_tokens=False)["input_ids"]) for c in convs)
    print(f"{machine()}; {len(convs)} prompts, {prompt_tokens / len(convs):.0f} prompt tokens each, {args.tokens} new tokens")

    t = time.perf_counter()
    for c in convs:  # the naive loop: one prompt per generate() call
        backend.generate([c], 1, sampling, prefill=prefill, progress=False)
    loop_s = time.perf_counter() - t
    new_tokens = len(convs) * args.tokens
    loop_tps = new_tokens / loop_s
    print(f"one-at-a-time loop: {loop_tps:7.1f} tok/s ({loop_s:.1f}s)")
    best = (1, loop_tps)
    for bs in [int(b) for b in args.batches.split(",")]:
        backend.cfg = cfg.model_copy(update={"batch_size": bs})
        t = time.perf_counter()
        backend.generate(convs, 1, sampling, prefill=prefill, progress=False)
        s = time.perf_counter() - t
        tps = new_tokens / s
        print(f"batched, batch_size={bs:2d}: {tps:7.1f} tok/s ({s:.1f}s)  x{tps / loop_tps:.2f} vs loop")
        if tps > best[1]:
            best = (bs, tps)
    backend.model.generation_config.min_new_tokens = None
    stage_s = stage_call(params, convs, prefill, backend, cfg)
    summary("generation", f"best batch_size={best[0]}: {best[1]:.1f} tok/s = x{best[1] / loop_tps:.2f} the "
            f"one-at-a-time loop ({loop_tps:.1f} tok/s); goal >= x4. raw_cots call ({len(convs)} prompts): "
            f"head cache on {stage_s['on']:.1f}s vs off {stage_s['off']:.1f}s = x{stage_s['off'] / stage_s['on']:.2f}; "
            f"+ reserved KV {stage_s['reserved']:.1f}s = x{stage_s['on'] / stage_s['reserved']:.2f} vs DynamicCache")


def stage_call(params, convs, prefill, backend, cfg) -> dict:
    """Wall time of raw_cots' structured generation with the default params: no head cache (transformers'
    DynamicCache), head cache with DynamicCache, head cache with the reserved-buffer KV cache (the default)."""
    from pipelines.raw_cots import structured_generate

    p = params.raw_cots
    times = {}
    for name, head, reserved in (("off", False, False), ("on", True, False), ("reserved", True, True)):
        backend.cfg = cfg.model_copy(update={"batch_size": p.generator.batch_size, "prefix_cache": head,
                                             "reserved_kv": reserved})
        backend._head = ((), None)  # no head cache carried over from the previous setting
        t = time.perf_counter()
        structured_generate(backend, convs, p.n_samples, p.sampling, prefill, p.cot_max_tokens)
        times[name] = time.perf_counter() - t
        print(f"raw_cots call, batch_size={p.generator.batch_size}, n={p.n_samples}, head cache {'on ' if head else 'off'}, "
              f"KV cache {'reserved' if reserved else 'dynamic'}: {times[name]:.1f}s")
    return times


if __name__ == "__main__":
    main()
