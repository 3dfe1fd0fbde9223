"""HTTP backend concurrency against a local stub server with fixed artificial latency: requests/s at concurrency
1/8/32 vs a sequential loop. Near-linear scaling is expected until the configured limit.

    python bench/bench_http.py [--requests 96] [--latency 0.05]
"""
from __future__ import annotations

import argparse
import time

from common import machine, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--levels", default="1,8,32")
    args = ap.parse_args()

    from pipelines.backends.openai_http import OpenAIChatBackend
    from pipelines.params import OpenAIBackend, Sampling
    from stub_openai_server import StubOpenAIServer

    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(args.requests)]
    sampling = Sampling(max_new_tokens=16)
    print(f"{machine()}; {args.requests} requests, {args.latency * 1000:.0f} ms server latency")
    with StubOpenAIServer(latency_s=args.latency) as server:
        cfg = OpenAIBackend(kind="openai", base_url=server.base_url, model="stub", concurrency=1)
        t = time.perf_counter()
        with OpenAIChatBackend(cfg) as b:
            for c in convs:  # sequential: one request per call
                b.generate([c], 1, sampling, progress=False)
        seq_rps = args.requests / (time.perf_counter() - t)
        print(f"sequential loop:   {seq_rps:7.1f} req/s")
        rows = []
        for level in [int(x) for x in args.levels.split(",")]:
            with OpenAIChatBackend(cfg.model_copy(update={"concurrency": level})) as b:
                server.reset()
                t = time.perf_counter()
                b.generate(convs, 1, sampling, progress=False)
                rps = args.requests / (time.perf_counter() - t)
            rows.append((level, rps, server.max_concurrent))
            print(f"concurrency={level:3d}: {rps:7.1f} req/s  x{rps / seq_rps:5.2f} vs sequential "
                  f"(ideal x{level}, server saw {server.max_concurrent} at once)")
    summary("http", ", ".join(f"c={lv}: x{r / seq_rps:.1f}" for lv, r, _ in rows) + " vs sequential")


if __name__ == "__main__":
    main()
