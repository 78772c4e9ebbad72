#!/usr/bin/env python3
"""Put two profiles side by side by kind of work: where does one program spend its step?

Development tool for issue #13 (docs/performance.md). Reads the JSON files that
`microdit bench --profile N --profile-json FILE` and
`tools/bench_reference.py train ... --profile N --profile-json FILE` write (the same
format: device time per kernel name on a GPU, each operator's self time on the CPU),
sorts every name into a kind of work (matrix products, attention, norms and modulation,
activations, expert routing, copies and casts, optimizer, Triton kernels that fuse
several of these, the rest), and prints milliseconds per step of each kind for each file,
their difference, and the names that take the most time in each kind.

  .venv/bin/python tools/compare_profiles.py microdit.json reference.json [--top 3]

On a GPU the times are the device's; on the CPU, each operator's self time summed over the
threads that ran operators (microdit's CPU workers each run theirs; ATen's intra-op threads
record none), so compare CPU profiles taken with one thread each.

The rules are substrings of the lower-cased name, tried in order (KINDS below); a name
that matches none is "other". `--kinds` prints which kind each name went to.
"""
import argparse
import json
import signal
import sys

# (kind, substrings): the first kind with a substring in the lower-cased name takes it.
# Attention comes before the products: cuDNN's attention kernels are named sm90_..., and
# flash attention's backward has gemm-like helpers. Triton kernels (torch.compile) name
# the operators they fuse: they go to the first kind they mention, else to "fused (Triton)".
KINDS = [
    ("attention", ["flash", "fmha", "sdpa", "attention", "cudnn::fusion", "dot_do_o", "dq_to_16bits"]),
    ("optimizer", ["adam", "multi_tensor_apply", "_foreach_", "fused_sgd", "grad_norm", "vector_norm"]),
    ("norms, modulation", ["layer_norm", "layernorm", "modln", "rms_norm", "_norm", "normfn", "gated_fwd",
                           "gated_bwd", "gated_residual", "gatedresidual", "modulate"]),
    ("matrix products", ["nvjet", "gemm", "cutlass", "xmma", "cublas", "splitkreduce", "aten::mm",
                         "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_int_mm", "aten::linear",
                         "aten::matmul", "mkldnn", "convolution", "conv2d", "brgemm"]),
    ("activations", ["gelu", "silu", "swiglu", "tanh", "sigmoid"]),
    ("expert routing", ["topk", "sort", "index_select", "indexselect", "index_add", "indexfunc", "scatter",
                        "gather", "moe_", "expert"]),
    ("copies, casts", ["copy", "cat", "memcpy", "memset", "clone", "contiguous", "_to_copy", "aten::to",
                       "fill", "zero_"]),
    ("fused (Triton)", ["triton_"]),
]
OTHER = "other"


def kind_of(name):
    low = name.lower()
    for kind, subs in KINDS:
        if any(s in low for s in subs):
            return kind
    return OTHER


def load(path):
    try:
        with open(path) as f:
            p = json.load(f)
    except OSError as e:
        sys.exit(f"compare_profiles: {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        sys.exit(f"compare_profiles: {path}: not JSON ({e.msg} at line {e.lineno})")
    for key in ("program", "device", "runs", "by_name"):
        if key not in p:
            sys.exit(f"compare_profiles: {path}: no '{key}' (not a --profile-json file)")
    if not isinstance(p["runs"], int) or p["runs"] < 1:
        sys.exit(f"compare_profiles: {path}: 'runs' must be an integer >= 1, got {p['runs']!r}")
    return p


def by_kind(p):
    """{kind: (ms per run, [(ms per run, name), ...] most first)}"""
    out = {}
    for row in p["by_name"]:
        ms = row["ms"] / p["runs"]
        kind = out.setdefault(kind_of(row["name"]), [0.0, []])
        kind[0] += ms
        kind[1].append((ms, row["name"]))
    for _, names in out.values():
        names.sort(reverse=True)
    return out


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the output quietly
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("profiles", nargs="+", help="one or two --profile-json files")
    ap.add_argument("--top", type=int, default=3, help="names shown per kind and file")
    ap.add_argument("--kinds", action="store_true", help="also list every name with its kind")
    args = ap.parse_args()
    if len(args.profiles) > 2:
        sys.exit("compare_profiles: give one or two files")
    if args.top < 0:
        sys.exit("compare_profiles: --top must be >= 0")
    ps = [load(f) for f in args.profiles]
    if len({p["device"] for p in ps}) > 1:
        sys.exit("compare_profiles: the files profile different devices "
                 f"({', '.join(p['device'] for p in ps)}): their times are not comparable")
    labels = [f"{p['program']} ({f})" for p, f in zip(ps, args.profiles)]
    kinds = [by_kind(p) for p in ps]
    unit = ps[0].get("unit", "time")
    print(f"ms per profiled run (a training step, or a whole sampling run) of {unit}, by kind of work:")
    for i, (p, lab) in enumerate(zip(ps, labels)):
        busy = sum(v[0] for v in kinds[i].values())
        wall = p.get("wall_ms")
        print(f"  [{i + 1}] {lab}: {p['runs']} run(s) profiled, {busy:.2f} ms busy per run"
              + (f", {wall / p['runs']:.2f} ms wall per run" if wall else ""))
    threads = [p.get("threads") for p in ps]
    if ps[0]["device"] == "cpu" and len(ps) == 2 and threads[0] != threads[1]:
        print(f"  note: on the CPU busy time sums each thread's operators, and the files have operators on "
              f"{threads[0]} and {threads[1]} threads: for like with like, profile both with one thread "
              f"(microdit bench --threads 1, bench_reference.py --threads 1)")
    order = [k for k, _ in KINDS] + [OTHER]
    head = "".join(f"{'[' + str(i + 1) + '] ms':>11}" for i in range(len(ps)))
    print(f"\n{'kind':<20}{head}" + (f"{'[1]-[2]':>10}{'[1]/[2]':>9}" if len(ps) == 2 else ""))
    totals = [0.0] * len(ps)
    for k in order:
        ms = [kinds[i].get(k, [0.0, []])[0] for i in range(len(ps))]
        if not any(ms):
            continue
        line = f"{k:<20}" + "".join(f"{m:11.2f}" for m in ms)
        if len(ps) == 2:
            line += f"{ms[0] - ms[1]:10.2f}" + (f"{ms[0] / ms[1]:9.2f}" if ms[1] > 0 else f"{'-':>9}")
        print(line)
        totals = [t + m for t, m in zip(totals, ms)]
    line = f"{'all':<20}" + "".join(f"{t:11.2f}" for t in totals)
    if len(ps) == 2:
        line += f"{totals[0] - totals[1]:10.2f}" + (f"{totals[0] / totals[1]:9.2f}" if totals[1] > 0 else "")
    print(line)
    if args.top:
        print(f"\nThe {args.top} names with the most time in each kind (ms per run):")
        for k in order:
            for i in range(len(ps)):
                names = kinds[i].get(k, [0.0, []])[1][:args.top]
                for ms, name in names:
                    print(f"  {k:<18} [{i + 1}] {ms:9.3f}  {name[:110]}")
    if args.kinds:
        print("\nEvery name and its kind:")
        for i in range(len(ps)):
            for row in ps[i]["by_name"]:
                print(f"  [{i + 1}] {kind_of(row['name']):<18} {row['name'][:120]}")


if __name__ == "__main__":
    main()
