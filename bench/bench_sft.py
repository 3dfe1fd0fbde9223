"""SFT throughput with packing vs padding on the same data and model (CPU): real (non-padding) tokens per second over
one pass of the SFT set, and the peak RSS of each run (each mode runs in its own process so peaks don't mix).

Data: data/sft_dataset/train.jsonl when the pipeline has run, else chat rows built from the training prompts.
Model: data/base_model (the embedded 135M model), full fine-tune, fp32.

    python bench/bench_sft.py [--rows 48] [--batch 4] [--epochs 2]

On CPU, TRL's packing ("bfd") trains padding-free: a batch is one flattened sequence of ~batch x max_length tokens,
so attention works on far longer sequences than the ~100-token padded rows; expect packing to be no faster there.
It pays off on GPUs with a FlashAttention kernel, which skips the cross-example attention.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, peak_rss_mb, summary


def rows_for_bench(n: int) -> list:
    from pipelines import catalog
    from pipelines.params import load_params

    params = load_params(ROOT / "params.yaml")
    path = ROOT / catalog.SFT_TRAIN
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    if len(rows) < n:  # pad with rows built from the training prompts (short refusal-style answers)
        for f in sorted((ROOT / params.paths.prompts).glob("*.jsonl")):
            for line in f.read_text().splitlines():
                r = json.loads(line)
                rows.append({"messages": [
                    {"role": "system", "content": params.sft_dataset.system_prompt},
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": f"<think>\nPolicy {r['policy']} applies.\n</think>\nAnswer."}]})
    return [{"messages": r["messages"]} for r in rows[:n]]


def worker(packing: bool, n_rows: int, batch: int, epochs: float) -> None:
    from transformers import AutoTokenizer

    from pipelines import catalog
    from pipelines.params import load_params
    from pipelines.sft_checkpoint import build_sft_trainer, sft_config
    from pipelines.training_common import load_model, training_chat_template

    params = load_params(ROOT / "params.yaml")
    section = params.sft_checkpoint.model_copy(update={"packing": packing, "per_device_batch_size": batch,
                                                       "epochs": epochs, "max_steps": None, "save_steps": 10_000, "logging_steps": 1000})
    rows = rows_for_bench(n_rows)
    model = load_model(ROOT / catalog.BASE_MODEL)
    tok = AutoTokenizer.from_pretrained(str(ROOT / catalog.BASE_MODEL))
    template = training_chat_template(tok, params.sft_dataset.system_prompt)
    # real tokens: what both modes train on (padding excluded), so tokens/s compares like with like
    lengths = [len(tok.apply_chat_template(r["messages"], chat_template=template, tokenize=True, return_dict=True)
                   ["input_ids"]) for r in rows]
    real = sum(min(section.max_length, n) for n in lengths)
    with tempfile.TemporaryDirectory() as work:
        args = sft_config(section, Path(work), steps=-1)
        args.disable_tqdm = True
        trainer = build_sft_trainer(model, tok, template, rows, args)
        t = time.perf_counter()
        trainer.train()
        dt = time.perf_counter() - t
        steps = trainer.state.global_step
    print(json.dumps({"packing": packing, "tokens": int(real * epochs), "seconds": dt, "steps": steps,
                      "peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--worker", choices=["pack", "pad"])
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker == "pack", args.rows, args.batch, args.epochs)
    print(f"{machine()}; {args.rows} SFT rows x {args.epochs:g} epochs, batch {args.batch}, full fine-tune of "
          "data/base_model, fp32")
    res = {}
    for mode in ("pad", "pack"):
        out = subprocess.run([sys.executable, __file__, "--worker", mode, "--rows", str(args.rows), "--batch",
                              str(args.batch), "--epochs", str(args.epochs)], capture_output=True, text=True, cwd=ROOT / "bench")
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[mode]
        print(f"{mode:4s}: {r['tokens'] / r['seconds']:7.1f} tok/s ({r['tokens']} tokens, {r['steps']} steps, "
              f"{r['seconds']:.1f}s), peak RSS {r['peak_rss_mb']:.0f} MB")
    ratio = (res["pack"]["tokens"] / res["pack"]["seconds"]) / (res["pad"]["tokens"] / res["pad"]["seconds"])
    summary("sft", f"packing x{ratio:.2f} tokens/s vs padding (goal >= x1.5); peak RSS pack "
            f"{res['pack']['peak_rss_mb']:.0f} MB vs pad {res['pad']['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
