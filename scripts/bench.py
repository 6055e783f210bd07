"""Benchmark a pipeline through the real HTTP path: start-up, warm-up load, a cold request for
another model, then N warm requests, with per-stage times (from the Server-Timing header),
peak process memory and, on CUDA, peak GPU memory. Prints the settings it ran with.

    python scripts/bench.py                                    # tiny mode on CPU, 64x64
    python scripts/bench.py --size 1024 --requests 10          # on a GPU with /models
    python scripts/bench.py --model ByteDance/SDXL-Lightning-4step --images 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from _common import ROOT  # noqa: E402,F401  (puts the repo on sys.path)


def stages(header: str) -> dict[str, float]:
    return {k.strip(): float(v) for k, v in (p.split(";dur=") for p in header.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="text-to-image")
    parser.add_argument("--model", default="", help="model_id for the timed requests")
    parser.add_argument("--cold-model", default="stabilityai/sd-turbo",
                        help="another model, timed once as a cold load through the cache")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()

    from fastapi.testclient import TestClient

    from runner.app import create_app
    from runner.settings import Settings

    settings = Settings(pipeline=args.pipeline)
    t0 = time.perf_counter()
    app = create_app(settings)
    service = app.state.service
    if service.tiny:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    body = {"prompt": "a photo of a cat on a sofa", "width": args.size, "height": args.size,
            "num_images_per_prompt": args.images, "seed": 1, "model_id": args.model}
    rows = []
    with TestClient(app) as client:
        while client.get("/health").json()["status"] == "LOADING":
            time.sleep(0.02)
        warm_s = time.perf_counter() - t0
        if args.cold_model:
            r = client.post(f"/{args.pipeline}", json={**body, "model_id": args.cold_model})
            rows.append(("cold " + args.cold_model, r.status_code, stages(
                r.headers.get("server-timing", "total;dur=0"))))
        for i in range(args.requests):
            started = time.perf_counter()
            r = client.post(f"/{args.pipeline}", json=body)
            timing = stages(r.headers.get("server-timing", "model;dur=0"))
            timing["http_total"] = (time.perf_counter() - started) * 1000
            rows.append((f"warm #{i + 1}", r.status_code, timing))
        models = client.get("/models").json()

    print("settings:", json.dumps({"mode": service.mode, "device": service.device.type,
                                   "pipeline": args.pipeline, "model": args.model or "default",
                                   "size": args.size, "images": args.images,
                                   "requests": args.requests,
                                   "threads": os.environ.get("OMP_NUM_THREADS", "default")}))
    print(f"start-up to health OK (imports + warm model + safety checker): {warm_s:.2f}s")
    for m in models["models"]:
        print(f"  loaded {m['id']:<45} {m['load_seconds']:7.2f}s  "
              f"est {m['estimated_bytes'] / 2**20:8.1f} MiB  "
              f"measured {(m['measured_bytes'] or 0) / 2**20:8.1f} MiB")
    print("per request (ms):")
    for name, status, timing in rows:
        print(f"  {name:<40} {status}  " + "  ".join(f"{k}={v:.1f}" for k, v in timing.items()))
    warm = [t["http_total"] for _, s, t in rows if "http_total" in t and s == 200]
    if warm:
        print(f"warm http_total: median {statistics.median(warm):.1f} ms, "
              f"min {min(warm):.1f} ms, max {max(warm):.1f} ms")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if service.device.is_cuda:
        import torch

        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
