"""One timed side of ``benchmarks/vs_kyutai.py``: runs in whichever interpreter the parent chose, so that
``import moshi`` is ours (the project's venv) or Kyutai's (a throwaway venv with their package).

Started with ``python -I`` (no script folder or working directory on ``sys.path``); reads one JSON job from
argv and prints one JSON line of results. Kept free of project imports so it runs against either package.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch


def lm(job: dict) -> dict:
    # benchmarks/ holds no `moshi`, so putting it on the path keeps `import moshi` the interpreter's own.
    sys.path.insert(0, str(Path(__file__).parent))
    import lm_step

    r = lm_step.run_one(job["config"], "cpu", torch.float32, job["batch"], job["frames"], job["warmup"], job["iters"],
                        job["loss"])
    return {"wall_s": r["median_s"], "cpu_s": r["cpu_median_s"]}


def mimi(job: dict) -> dict:
    from moshi.models import loaders

    torch.manual_seed(0)
    model = loaders.get_mimi(None, device="cpu")
    model.set_num_codebooks(job["num_codebooks"])
    model.eval()
    samples = int(job["seconds"] * 24000) // 1920 * 1920
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(samples, dtype=torch.float32) / 24000
    audio = 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.05 * torch.randn(job["batch"], 1, samples, generator=gen)
    result: dict = {}
    with torch.inference_mode():
        codes = model.encode(audio)
        for op, fn in (("encode", lambda: model.encode(audio)), ("decode", lambda: model.decode(codes))):
            wall, cpu = [], []
            for i in range(job["warmup"] + job["iters"]):
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                fn()
                r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                if i >= job["warmup"]:
                    wall.append(t1 - t0)
                    cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
            result[f"{op}_wall_s"] = statistics.median(wall)
            result[f"{op}_cpu_s"] = statistics.median(cpu)
    result["wall_s"] = result["encode_wall_s"] + result["decode_wall_s"]
    result["cpu_s"] = result["encode_cpu_s"] + result["decode_cpu_s"]
    return result


def main() -> None:
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job["threads"])
    import moshi

    result = {"lm": lm, "mimi": mimi}[job["bench"]](job)
    result["moshi_file"] = moshi.__file__
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
