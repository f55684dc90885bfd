"""Run `blitzgen bench ARGS` in-process, then dump torch.compile timing metrics as JSON.
usage: python benchmarks/compile_breakdown.py OUT.json -- bench args... (prints one CM line per compiled graph)"""
import dataclasses, json, sys, time
T0 = time.time()
import torch  # noqa
T_IMPORT = time.time() - T0
from blitzgen.cli import main
out = sys.argv[1]
args = sys.argv[sys.argv.index("--") + 1:]
t = time.time()
rc = main(["bench"] + args)
wall = time.time() - t
from torch._dynamo.utils import counters, get_compilation_metrics
keys = ("co_name", "is_runtime", "duration_us", "dynamo_cumulative_compile_time_us", "aot_autograd_cumulative_compile_time_us",
        "inductor_cumulative_compile_time_us", "inductor_code_gen_cumulative_compile_time_us", "triton_compile_time_us",
        "runtime_cudagraphify_time_us", "runtime_triton_autotune_time_us", "compile_time_autotune_time_us",
        "entire_frame_compile_time_s", "backend_compile_time_s", "inductor_compile_time_s", "code_gen_time_s",
        "fx_graph_cache_hit" if False else "cache_size")
ms = []
for m in get_compilation_metrics():
    d = dataclasses.asdict(m) if dataclasses.is_dataclass(m) else dict(m)
    ms.append({k: d.get(k) for k in keys if k in d})
rec = {"rc": rc, "import_torch_s": T_IMPORT, "bench_wall_s": wall, "args": args, "compilation_metrics": ms,
       "counters": {k: dict(v) for k, v in counters.items()}}
json.dump(rec, open(out, "w"), indent=1)
for m in ms:
    print("CM", json.dumps({k: (round(v / 1e6, 2) if k.endswith("_us") and v else v) for k, v in m.items()}))
