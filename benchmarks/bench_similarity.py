"""Benchmark of the similarity engine (dery.passes.similarity) against a per-pair CKA loop.

    /work/venv/bin/python benchmarks/bench_similarity.py [--quick] [--models a,b,...] [--n N]

One run writes benchmarks/results/similarity.md and benchmarks/results/similarity.json.

(a) Pooled features (DeRy's mode). A zoo of timm networks at 224 px with seeded random
    weights (`name:random`) runs once over N probe images of `digits(224)`, every boundary cut
    an extra output (`Lowered.with_cut_outputs`), each cut pooled per image (`similarity.pool`);
    the forward passes are timed on their own. On the same float64 features of all P points:
    * engine: per point the N x N Gram X X^T (as `model_grams` computes it), then
      `cka_from_grams` on the stack: one batched product for all pairs;
    * per pair: for each of the P(P-1)/2 pairs, centre both points' features and compute
      ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), with nothing reused between pairs.
    Both matrices must agree to 1e-8.
(b) Full feature maps (mode "full"): dery's `model_grams` with the minibatch estimator at
    chunks 32, 64 and 128 for a few networks, each run in a fresh process for its peak memory,
    and the memory a per-pair computation would need for full features, from the cut shapes.

Memory: every measured step runs in a fresh subprocess (`--worker`) that loads its inputs
first, then resets the kernel's peak-RSS mark (/proc/self/clear_refs) and records
peak RSS - RSS at the start of the step: all allocations (numpy, BLAS, torch) count the same
way. Pooled-mode steps are pure numpy and also report tracemalloc's peak (numpy's own array
allocations, exact and deterministic), with tracing on for both methods alike.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import _common as common
import numpy as np
import torch
from dery.passes.similarity import cka_from_grams

RESULTS = common.RESULTS
TOL = 1e-8
RESOLUTION = 224
ZOO = ("resnet50", "regnety_016", "mobilenetv2_100", "mobilenetv3_large_100", "efficientnet_b0", "convnext_tiny",
       "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224")
FULL_MODELS = ("deit_tiny_patch16_224", "mobilenetv2_100")
FULL_CHUNKS = (32, 64, 128)
QUICK_ZOO = ("resnet18", "mobilenetv2_100", "deit_tiny_patch16_224")
QUICK_FULL_MODELS = ("deit_tiny_patch16_224",)
QUICK_FULL_CHUNKS = (16, 32)
GB = 1e9


# ------------------------------------------------------------------------------------------
# measurement helpers


def rss_kb() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) of this process, in kB."""
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM"))


def reset_peak_rss() -> None:
    """Make the kernel's peak-RSS mark (VmHWM) equal the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def measured(fn, *, trace: bool) -> tuple[object, dict]:
    """Run fn() and return its result with wall and CPU time (all threads of this process), peak RSS
    growth and (if traced) tracemalloc's peak."""
    gc.collect()
    reset_peak_rss()
    start_kb, _ = rss_kb()
    if trace:
        tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    stats = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    if trace:
        stats["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    stats["rss_peak_delta_bytes"] = (rss_kb()[1] - start_kb) * 1024
    return out, stats


def run_worker(*args: str) -> dict:
    """Run this script as a worker in a fresh process; return the JSON it prints last."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    blas = np.__config__.CONFIG.get("Build Dependencies", {}).get("blas", {})
    return common.machine("torch", "timm", "numpy", torch_threads=torch.get_num_threads(),
                          blas=f"{blas.get('name', '?')} {blas.get('version', '')}".strip(),
                          memory_gb=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB)


# ------------------------------------------------------------------------------------------
# the two CKA computations (pooled features, float64)


def engine(by_model: list[list[np.ndarray]]) -> np.ndarray:
    """dery's way: one N x N Gram per point (a block per network, concatenated as `similarity` does),
    then all pairs from one batched product."""
    grams = np.concatenate([np.stack([x @ x.T for x in feats])[:, None] for feats in by_model])
    matrix, estimator = cka_from_grams(grams)
    assert estimator == "exact"
    return matrix


def per_pair(feats: list[np.ndarray]) -> np.ndarray:
    """The straightforward way: every pair from both points' centred features, nothing reused."""
    p = len(feats)
    m = np.eye(p)
    for i in range(p):
        for j in range(i + 1, p):
            x = feats[i] - feats[i].mean(axis=0)
            y = feats[j] - feats[j].mean(axis=0)
            m[i, j] = m[j, i] = (np.linalg.norm(y.T @ x) ** 2
                                 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))
    return m


def pooled_worker(method: str, features: Path, out: Path) -> dict:
    """Worker: load the pooled features, run one method under measurement, save its matrix."""
    with np.load(features) as z:
        keys = sorted(z.files, key=lambda k: tuple(map(int, k[1:].split("_"))))
        by_model: dict[str, list[np.ndarray]] = {}
        for k in keys:
            by_model.setdefault(k.split("_")[0], []).append(z[k])
    if method == "engine":
        matrix, stats = measured(lambda: engine(list(by_model.values())), trace=True)
    else:
        flat = [x for feats in by_model.values() for x in feats]
        matrix, stats = measured(lambda: per_pair(flat), trace=True)
    np.save(out, matrix)
    return {**stats, "input_bytes": sum(x.nbytes for feats in by_model.values() for x in feats)}


def full_worker(model: str, images: Path, n: int, chunk: int, out: Path) -> dict:
    """Worker: dery's model_grams in full mode on the first n images at one chunk size."""
    from dery.cache import Cache
    from dery.data import digits
    from dery.passes.lower import lower
    from dery.passes.similarity import model_grams
    from dery.zoo import load_member, parse_zoo

    x = torch.from_numpy(np.load(images)[:n]).float().div_(255.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # load_member does not read the data set for random weights; a small one stands in
        lw = lower(load_member(parse_zoo(f"{model}:random")[0], digits(32, probe=8), Cache()))
    with torch.no_grad():
        lw.with_cut_outputs(tuple(c.name for c in lw.boundary_cuts()))(x[:2])  # warm-up outside the measurement
    grams, stats = measured(lambda: model_grams(lw, x, mode="full", chunk=chunk), trace=False)
    np.save(out, grams)
    dims = [math.prod(c.shape[1:]) for c in lw.boundary_cuts()]
    return {**stats, "points": len(dims), "dims_total": sum(dims), "dims_max": max(dims),
            "grams_bytes": grams.nbytes}


# ------------------------------------------------------------------------------------------
# the parent: features, the measured runs, the report


def extract_pooled(name: str, images: torch.Tensor, batch: int) -> dict:
    """Lower one network and run it once over the images; pooled float64 features per boundary cut."""
    from dery.cache import Cache
    from dery.data import digits
    from dery.passes.lower import lower
    from dery.passes.similarity import pool
    from dery.zoo import load_member, parse_zoo

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lw = lower(load_member(parse_zoo(f"{name}:random")[0], digits(32, probe=8), Cache()))
    lower_s = time.perf_counter() - t0
    cuts = lw.boundary_cuts()
    net = lw.with_cut_outputs(tuple(c.name for c in cuts))
    feats: list[list[torch.Tensor]] = [[] for _ in cuts]
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            for j, (c, t) in enumerate(zip(cuts, net(images[i:i + batch])[1:])):
                feats[j].append(pool(t, c.layout))
    forward_s = time.perf_counter() - t0
    pooled = [torch.cat(f).double().numpy() for f in feats]
    return {"name": name, "lowered": lw, "features": pooled, "lower_s": lower_s, "forward_s": forward_s,
            "cuts": [{"name": c.name, "shape": list(c.shape), "layout": c.layout} for c in cuts]}


def check_against_model_grams(net: dict, images: torch.Tensor) -> float:
    """Largest |Gram from our pooled features - dery's model_grams| on the first images (same path)."""
    from dery.passes.similarity import model_grams

    n = images.shape[0]
    ref = model_grams(net["lowered"], images, mode="pooled", chunk=n)[:, 0]
    ours = np.stack([x[:n] @ x[:n].T for x in net["features"]])
    return float(np.abs(ref - ours).max() / max(np.abs(ref).max(), 1e-300))


def median_run(runs: list[dict]) -> dict:
    """Median of each measurement over repeated runs (memory peaks repeat to within allocator noise)."""
    return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}


def cka_flops(dims: list[int], n: int) -> tuple[float, float]:
    """Multiply-add FLOPs (x2) of the engine (Grams + the batched product) and of the per-pair loop."""
    p, d = len(dims), np.array(dims, dtype=float)
    engine_flops = 2 * n * n * d.sum() + 2 * p * p * n * n
    cross = (d.sum() ** 2 - (d * d).sum()) / 2
    return float(engine_flops), float(2 * n * (cross + (p - 1) * (d * d).sum()))


def fmt_bytes(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b:.0f} B"


def full_estimates(nets: list[dict], n: int) -> dict:
    """Memory a per-pair CKA on full (unpooled) features at N images would need, from the cut shapes."""
    dims = {net["name"]: [math.prod(c["shape"][1:]) for c in net["cuts"]] for net in nets}
    all_dims = sorted((d for ds in dims.values() for d in ds), reverse=True)
    return {
        "n": n,
        "all_features_float64_bytes": n * sum(all_dims) * 8,
        "all_features_float32_bytes": n * sum(all_dims) * 4,
        "per_network_float64_bytes": {k: n * sum(v) * 8 for k, v in dims.items()},
        "largest_point_dims": all_dims[0],
        "largest_pair_features_float64_bytes": n * (all_dims[0] + all_dims[1]) * 8,
        "largest_pair_cross_covariance_float64_bytes": all_dims[0] * all_dims[1] * 8,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 networks, N = 64, one full-mode network")
    parser.add_argument("--models", help="comma-separated timm names for the pooled zoo")
    parser.add_argument("--n", type=int, help="probe images (default 512, quick 64)")
    parser.add_argument("--batch", type=int, default=32, help="forward batch for feature extraction")
    parser.add_argument("--repeats", type=int, default=3, help="engine runs (the per-pair loop runs once)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    os.environ.setdefault("DERY_CACHE_DIR", str(Path(tempfile.gettempdir()) / "bench-cache"))
    os.environ.setdefault("DERY_QUIET", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.worker:
        kind, *rest = args.worker
        if kind == "pooled":
            doc = pooled_worker(rest[0], Path(rest[1]), Path(rest[2]))
        else:
            doc = full_worker(rest[0], Path(rest[1]), int(rest[2]), int(rest[3]), Path(rest[4]))
        print(json.dumps(doc))
        return 0

    started = time.perf_counter()
    info = machine()
    n = args.n or (64 if args.quick else 512)
    zoo = tuple(m.strip() for m in args.models.split(",")) if args.models else (QUICK_ZOO if args.quick else ZOO)
    full_models = QUICK_FULL_MODELS if args.quick else FULL_MODELS
    chunks = QUICK_FULL_CHUNKS if args.quick else FULL_CHUNKS

    from dery.data import digits

    probe = digits(RESOLUTION, probe=n).split("probe").images
    if len(probe) < n:
        raise SystemExit(f"digits has only {len(probe)} probe images, asked for {n}")
    with tempfile.TemporaryDirectory(prefix="bench-similarity-") as tmp:
        work = Path(tmp)
        np.save(work / "images.npy", probe[:n].numpy())
        pooled, networks = pooled_benchmark(zoo, probe[:n].float().div_(255.0), work, args.batch, args.repeats)
        full = full_benchmark(full_models, chunks, n, work)
    full["per_pair_estimate"] = full_estimates(networks, n)
    info["load_avg_end"] = os.getloadavg()
    command = "/work/venv/bin/python benchmarks/bench_similarity.py" + (
        " " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    doc = {"command": command, "machine": info, "mode": "quick" if args.quick else "full", "resolution": RESOLUTION,
           "networks": networks, "pooled": pooled, "full": full, "total_s": time.perf_counter() - started}
    write_report(doc)
    if not pooled["agree"]:
        print(f"engine and per-pair matrices differ by {pooled['max_abs_diff']:.3g} (> {TOL:g})", file=sys.stderr)
        return 1
    return 0


def pooled_benchmark(zoo: tuple[str, ...], images: torch.Tensor, work: Path, batch: int,
                     repeats: int) -> tuple[dict, list[dict]]:
    """(a): shared feature extraction, then the engine (`repeats` runs) and the per-pair loop (one run)."""
    n = images.shape[0]
    nets = []
    for name in zoo:
        net = extract_pooled(name, images, batch)
        print(f"{name}: {len(net['cuts'])} points, lower {net['lower_s']:.1f} s, forward {net['forward_s']:.1f} s",
              file=sys.stderr, flush=True)
        nets.append(net)
    cheapest = min(nets, key=lambda d: d["forward_s"])
    gram_check = check_against_model_grams(cheapest, images[:32])
    for net in nets:
        del net["lowered"]
    features_file = work / "pooled.npz"
    np.savez(features_file, **{f"m{k}_{i}": x for k, net in enumerate(nets) for i, x in enumerate(net["features"])})
    dims = [x.shape[1] for net in nets for x in net["features"]]
    networks = [{k: net[k] for k in ("name", "lower_s", "forward_s", "cuts")} | {
        "points": len(net["cuts"]), "pooled_dims": sum(x.shape[1] for x in net["features"])} for net in nets]
    del nets
    gc.collect()
    runs: dict[str, list[dict]] = {"engine": [], "per_pair": []}
    for method in ("engine",) * repeats + ("per_pair",):
        r = run_worker("pooled", method, str(features_file), str(work / f"{method}.npy"))
        runs[method].append(r)
        print(f"{method}: {r['wall_s']:.2f} s (cpu {r['cpu_s']:.2f} s), rss +{fmt_bytes(r['rss_peak_delta_bytes'])}",
              file=sys.stderr, flush=True)
    max_diff = float(np.abs(np.load(work / "engine.npy") - np.load(work / "per_pair.npy")).max())
    eng, base = median_run(runs["engine"]), median_run(runs["per_pair"])
    flops_engine, flops_pair = cka_flops(dims, n)
    p = len(dims)
    pooled = {
        "n": n, "points": p, "pairs": p * (p - 1) // 2, "dims_max": max(dims), "dims_total": sum(dims),
        "runs": runs, "engine": eng, "per_pair": base, "max_abs_diff": max_diff, "agree": max_diff < TOL,
        "model_grams_check_rel_diff": gram_check, "model_grams_check_model": cheapest["name"],
        "speedup": base["wall_s"] / eng["wall_s"], "speedup_cpu": base["cpu_s"] / eng["cpu_s"],
        "flops_engine": flops_engine, "flops_per_pair": flops_pair,
        "memory_ratio_tracemalloc": eng["tracemalloc_peak_bytes"] / base["tracemalloc_peak_bytes"],
        "memory_ratio_rss": eng["rss_peak_delta_bytes"] / max(base["rss_peak_delta_bytes"], 1),
        "forward_total_s": sum(net["forward_s"] for net in networks),
    }
    return pooled, networks


def full_benchmark(models: tuple[str, ...], chunks: tuple[int, ...], n: int, work: Path) -> dict:
    """(b): dery's model_grams in full mode per network and chunk (plus one run at N/2), each in a fresh
    process, then cka_from_grams on the stacked Grams per chunk."""
    plan = [(m, n, c) for m in models for c in chunks] + [(models[0], n // 2, chunks[len(chunks) // 2])]
    runs, files = [], []
    for model, size, chunk in plan:
        out = work / f"full-{model}-{size}-{chunk}.npy"
        r = run_worker("full", model, str(work / "images.npy"), str(size), str(chunk), str(out))
        r.update(model=model, n=size, chunk=chunk, feature_buffer_bytes=chunk * (4 * r["dims_total"]
                                                                                + 12 * r["dims_max"]))
        runs.append(r)
        files.append(out)
        print(f"full {model} N={size} chunk={chunk}: {r['wall_s']:.1f} s, rss "
              f"+{fmt_bytes(r['rss_peak_delta_bytes'])}", file=sys.stderr, flush=True)
    cka = []
    for chunk in chunks:
        grams = np.concatenate([np.load(f) for r, f in zip(runs, files) if r["chunk"] == chunk and r["n"] == n])
        (_, estimator), stats = measured(lambda g=grams: cka_from_grams(g), trace=True)
        cka.append({"chunk": chunk, "points": grams.shape[0], "estimator": estimator, **stats})
    return {"runs": runs, "cka": cka}


def full_summary(full: dict, n: int) -> list[str]:
    """Bullet lines: peak memory against chunk and N, next to holding the network's full features."""
    est = full["per_pair_estimate"]["per_network_float64_bytes"]
    lines = []
    for model in dict.fromkeys(r["model"] for r in full["runs"]):
        at_n = [r for r in full["runs"] if r["model"] == model and r["n"] == n]
        peaks = " / ".join(fmt_bytes(r["rss_peak_delta_bytes"]) for r in at_n)
        chunks = "/".join(str(r["chunk"]) for r in at_n)
        held = f"{fmt_bytes(est[model])} (float64)" if model in est else "-"
        lines.append(f"- {model}: peak {peaks} at chunk {chunks} and N = {n}; all its full features at N = {n} "
                     f"would take {held}")
        for half in (r for r in full["runs"] if r["model"] == model and r["n"] != n):
            same = next(r for r in at_n if r["chunk"] == half["chunk"])
            lines.append(f"- {model}, chunk {half['chunk']}: N = {half['n']} peaks at "
                         f"{fmt_bytes(half['rss_peak_delta_bytes'])}, N = {n} at "
                         f"{fmt_bytes(same['rss_peak_delta_bytes'])}: the peak follows the chunk, not N (only the "
                         f"kept Grams, P x N x chunk x 8 bytes, grow with N)")
    return lines


def write_report(doc: dict) -> None:
    """similarity.md and similarity.json from the run's document."""
    info, pooled, full = doc["machine"], doc["pooled"], doc["full"]
    eng, base = pooled["engine"], pooled["per_pair"]
    eng_walls = ", ".join(f"{r['wall_s']:.2f}" for r in pooled["runs"]["engine"])
    n = pooled["n"]
    est = full["per_pair_estimate"]
    md = [
        "# Similarity engine benchmark (`benchmarks/bench_similarity.py`)",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Machine: {info['cpu']}, {info['cores_usable']} usable cores (shared with other work; load average "
        f"{info['load_avg_start'][0]:.1f} at start, {info['load_avg_end'][0]:.1f} at end), {info['memory_gb']:.0f} GB "
        f"RAM; torch {info['torch']} ({info['torch_threads']} threads), numpy {info['numpy']} ({info['blas']}, 2 "
        f"threads), timm {info['timm']}, Python {info['python']}. Mode: {doc['mode']}; total run "
        f"{doc['total_s'] / 60:.1f} min.",
        "",
        f"Zoo: {len(doc['networks'])} timm networks at {doc['resolution']} px with seeded random weights, N = {n} "
        f"probe images of `digits({doc['resolution']})`. Every measured step runs in a fresh process; peak RSS is "
        "the growth of the kernel's high-water mark over the step (reset just before it), tracemalloc counts "
        "numpy's own allocations (tracing on for both methods alike; the per-pair loop makes a handful of array "
        "allocations per pair, so tracing adds little to either).",
        "",
        "## (a) Pooled features (DeRy's mode), float64",
        "",
        f"- {pooled['points']} points ({pooled['pairs']:,} pairs), pooled widths up to {pooled['dims_max']}, "
        f"{pooled['dims_total']:,} in total",
        f"- **engine {eng['wall_s']:.2f} s vs per pair {base['wall_s']:.1f} s wall time: {pooled['speedup']:.0f}x "
        f"faster** (CPU time {eng['cpu_s']:.2f} s vs {base['cpu_s']:.1f} s: {pooled['speedup_cpu']:.0f}x; engine: "
        f"median of {len(pooled['runs']['engine'])} runs, {eng_walls} s); "
        f"arithmetic {pooled['flops_engine'] / 1e9:,.1f} vs {pooled['flops_per_pair'] / 1e9:,.1f} GFLOP "
        f"({pooled['flops_per_pair'] / pooled['flops_engine']:.0f}x)",
        f"- **peak memory, engine vs per pair: tracemalloc {fmt_bytes(eng['tracemalloc_peak_bytes'])} vs "
        f"{fmt_bytes(base['tracemalloc_peak_bytes'])} (ratio {pooled['memory_ratio_tracemalloc']:.1f}); RSS "
        f"+{fmt_bytes(eng['rss_peak_delta_bytes'])} vs +{fmt_bytes(base['rss_peak_delta_bytes'])} (ratio "
        f"{pooled['memory_ratio_rss']:.1f})**; input features {fmt_bytes(eng['input_bytes'])}, not counted",
        f"- same matrix: max |engine - per pair| = {pooled['max_abs_diff']:.2e} (tolerance {TOL:g}): "
        f"{'yes' if pooled['agree'] else 'NO'}",
        f"- the engine's Grams equal dery's `model_grams` (pooled, {pooled['model_grams_check_model']}, 32 images): "
        f"relative diff {pooled['model_grams_check_rel_diff']:.1e}",
        f"- the shared forward passes ({n} images through every network, all boundary cuts as outputs): "
        f"{pooled['forward_total_s']:.0f} s in total, the dominant cost of the pass "
        f"({pooled['forward_total_s'] / eng['wall_s']:.0f}x the engine)",
        "",
        f"Where the memory goes: the engine holds the P Grams, P x N x N float64 ("
        f"{fmt_bytes(pooled['points'] * n * n * 8)} here), plus `cka_from_grams`' centred copy and the "
        f"concatenation (a few times that), so it grows with P N^2 whatever the widths; the per-pair loop holds "
        f"two points' centred features and their d x d cross-covariance (at most "
        f"{fmt_bytes(pooled['dims_max'] ** 2 * 8)} for the widest point), so it grows with N d + d^2. "
        + ("Here the engine needs more memory: it trades memory for time."
           if pooled["memory_ratio_tracemalloc"] > 1 else "Here the engine needs less memory as well."),
        "",
        "| network | points | pooled dims | lower s | forward s |",
        "|---|---|---|---|---|",
        *(f"| {net['name']} | {net['points']} | {net['pooled_dims']:,} | {net['lower_s']:.1f} | "
          f"{net['forward_s']:.1f} |" for net in doc["networks"]),
        "",
        "## (b) Full feature maps: `model_grams(mode='full')`, minibatch estimator",
        "",
        "Peak RSS growth of one `model_grams` call (forward passes included) per network, N and chunk; "
        "'feature buffer' is what model_grams holds for one chunk: every cut's float32 features of `chunk` "
        "images plus the concatenated float32 and float64 copies of the largest cut, chunk x (4 x sum dims + "
        "12 x max dims); the forward pass itself runs min(64, chunk) images at a time.",
        "",
        "| network | points | dims per image | N | chunk | wall s | peak RSS growth | feature buffer | Grams kept |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['model']} | {r['points']} | {r['dims_total']:,} | {r['n']} | {r['chunk']} | {r['wall_s']:.1f} | "
          f"{fmt_bytes(r['rss_peak_delta_bytes'])} | {fmt_bytes(r['feature_buffer_bytes'])} | "
          f"{fmt_bytes(r['grams_bytes'])} |" for r in full["runs"]),
        "",
        *full_summary(full, n),
        "",
        "CKA from the stacked Grams of those networks (`cka_from_grams`, minibatch estimator; measured in the "
        "main process):",
        "",
        "| chunk | points | estimator | wall s | tracemalloc peak | RSS growth |",
        "|---|---|---|---|---|---|",
        *(f"| {c['chunk']} | {c['points']} | {c['estimator']} | {c['wall_s']:.3f} | "
          f"{fmt_bytes(c['tracemalloc_peak_bytes'])} | {fmt_bytes(c['rss_peak_delta_bytes'])} |" for c in full["cka"]),
        "",
        f"A per-pair computation on full features at N = {n} needs every point's features at once (each point "
        f"pairs with all others; recomputing forward passes per pair would be worse): for the pooled zoo above "
        f"that is **{fmt_bytes(est['all_features_float64_bytes'])} in "
        f"float64** ({fmt_bytes(est['all_features_float32_bytes'])} in float32), "
        + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in est["per_network_float64_bytes"].items())
        + f". Its feature-space formula also forms d_x x d_y cross-covariances: the largest point has "
        f"{est['largest_point_dims']:,} dims per image, so the largest pair's Yc^T Xc alone would be "
        f"{fmt_bytes(est['largest_pair_cross_covariance_float64_bytes'])}.",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "similarity.md").write_text("\n".join(md) + "\n")
    (RESULTS / "similarity.json").write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(md), file=sys.stderr)


if __name__ == "__main__":
    common.run(main)
