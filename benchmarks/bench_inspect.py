"""Benchmark of `dery inspect` (the lower pass) across timm families, to find where lowering fails.

    /work/venv/bin/python benchmarks/bench_inspect.py [--quick] [--models a,b,...] [--timeout S]

One run writes benchmarks/results/inspect.md and benchmarks/results/inspect.json. For each
model, `dery.driver.inspect_json("<name>:random")` (seeded random weights): the number of cut
points and boundary cuts, the method ("fx", or the "feature_info" fallback with its warning),
the largest |blockwise - whole| logit difference on two random images, the wall time, or the
exception when lowering fails. Done when (the issue): the 11 required networks each give >= 8
cut points with max_abs_diff <= 1e-5, and so do the other families a user would try.

For models that end with fewer than 8 cuts, the script lowers them once more and records how
many single-tensor (fine) cuts the graph had before the block-level filter, which tells a
graph without crossings apart from cuts that the filter dropped.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import _common as common
import torch

RESULTS = common.RESULTS
MIN_CUTS = 8
MAX_DIFF = 1e-5

REQUIRED = ("resnet50", "resnext50_32x4d", "regnety_016", "mobilenetv2_100", "mobilenetv3_large_100",
            "efficientnet_b0", "convnext_tiny", "deit_tiny_patch16_224", "vit_small_patch16_224",
            "swin_tiny_patch4_window7_224", "mobilenext_100")

# Other families a user would try (one or two members each); names missing from the installed
# timm are reported and skipped.
SWEEP = (
    # residual CNNs
    "resnet18", "resnet101", "wide_resnet50_2", "seresnet50", "skresnet18", "res2net50_26w_4s", "resnest14d",
    "resnetv2_50", "tresnet_m", "regnetx_002", "regnetz_b16", "botnet26t_256", "halonet26t",
    # other CNNs
    "densenet121", "inception_v3", "inception_resnet_v2", "xception41", "legacy_xception", "vgg11", "dla34", "dpn68",
    "hrnet_w18_small", "cspresnet50", "darknet53", "ese_vovnet19b_dw", "selecsls42b", "repvgg_a2", "hgnet_tiny",
    "nfnet_l0", "convnextv2_tiny", "inception_next_tiny", "rdnet_tiny",
    # mobile / NAS
    "mobilenetv4_conv_small", "mobilenetv4_hybrid_medium", "efficientnet_b3", "efficientnetv2_rw_s",
    "tf_efficientnet_lite0", "tinynet_a", "mnasnet_100", "ghostnet_100", "ghostnetv2_100", "rexnet_100", "repvit_m1",
    "starnet_s1", "fastvit_t8",
    # hybrids
    "mobilevit_s", "mobilevitv2_100", "levit_128", "efficientformer_l1", "efficientformerv2_s0", "efficientvit_b0",
    "efficientvit_m0", "edgenext_small", "coatnet_0_rw_224", "maxvit_tiny_rw_224", "tiny_vit_5m_224", "visformer_tiny",
    "convit_tiny", "coat_lite_tiny", "nextvit_small",
    # vision transformers
    "vit_base_patch16_224", "vit_base_patch16_siglip_224", "vit_small_patch14_reg4_dinov2",
    "deit_small_distilled_patch16_224", "deit3_small_patch16_224", "beit_base_patch16_224", "eva02_tiny_patch14_224",
    "cait_xxs24_224", "pit_s_224", "crossvit_tiny_240", "tnt_s_patch16_224", "xcit_tiny_12_p16_224", "twins_svt_small",
    "pvt_v2_b0", "mvitv2_tiny", "hiera_tiny_224",
    # windowed / focal / MLP / pooling / other mixers
    "swinv2_tiny_window8_256", "davit_tiny", "focalnet_tiny_srf", "gcvit_xxtiny", "poolformer_s12", "mixer_b16_224",
    "resmlp_12_224", "convmixer_768_32", "sequencer2d_s", "mambaout_tiny",
)
QUICK = ("resnet18", "mobilenetv3_large_100", "deit_tiny_patch16_224", "mobilenext_100")


class Timeout(Exception):
    """A model took longer than the per-model limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Timeout in this thread after `seconds` (checked between Python bytecodes)."""
    def fire(signum: int, frame: object) -> None:
        raise Timeout(f"over {seconds:g} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def machine() -> dict:
    return common.machine("torch", "timm", "numpy", torch_threads=torch.get_num_threads())


def families(names: list[str]) -> dict[str, str]:
    """timm module (family) of each model name."""
    import timm

    by_name = {m: mod for mod in timm.list_modules() for m in timm.list_models(module=mod)}
    return {n: by_name.get(n, "?") for n in names}


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def fine_cut_count(name: str) -> dict:
    """Lower the model again and count its single-tensor cuts before the block-level filter."""
    from dery.cache import Cache
    from dery.data import digits
    from dery.passes.lower import lower
    from dery.zoo import load_member, native_resolution, parse_zoo

    specs = parse_zoo(f"{name}:random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lw = lower(load_member(specs[0], digits(native_resolution(specs), probe=8), Cache()))
    return {"fine_cuts": len(lw.fine_cuts), "features_end": lw.features_end}


def inspect_one(name: str, timeout: float) -> dict:
    """inspect_json on one model, with its wall time; exceptions are recorded, not raised."""
    from dery.driver import inspect_json

    row: dict = {"model": name}
    t0 = time.perf_counter()
    try:
        with time_limit(timeout), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            doc = inspect_json(f"{name}:random")
    except Timeout as e:
        row.update(status="timeout", error=str(e))
    except Exception as e:  # the point is to record every failure, whatever its type
        cause = e.__cause__
        row.update(status="error", error=first_line(e), cause=first_line(cause) if cause is not None else None)
    else:
        cuts = doc["cut_points"]
        row.update(status="ok", method=doc["method"], warning=doc["warning"], input_shape=doc["input_shape"],
                   cuts=len(cuts), boundary=sum(c["boundary"] for c in cuts), max_abs_diff=doc["max_abs_diff"],
                   layouts=sorted({c["layout"] for c in cuts}),
                   other_warnings=sorted({str(w.message).splitlines()[0][:200] for w in caught
                                          if "torch.fx could not trace" not in str(w.message)}))
        row["meets"] = bool(row["cuts"] >= MIN_CUTS and row["max_abs_diff"] <= MAX_DIFF)
        if row["cuts"] < MIN_CUTS:
            row.update(fine_cut_count(name))
    row["wall_s"] = time.perf_counter() - t0
    return row


def fmt_diff(v: float | None) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.1e}")


def table(rows: list[dict]) -> list[str]:
    out = ["| family | model | input | status | method | cuts | boundary | max_abs_diff | meets | wall s | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["model"])):
        note = r.get("error") or ""
        if r.get("cause"):
            note += f" (cause: {r['cause']})"
        if r.get("warning"):
            note = r["warning"]
        if "fine_cuts" in r:
            note = (note + "; " if note else "") + f"{r['fine_cuts']} single-tensor cuts before the block filter"
        note = note.replace("|", "\\|").replace("\n", " ")[:260]
        shape = "x".join(map(str, r["input_shape"][1:])) if r.get("input_shape") else "-"
        meets = {True: "yes", False: "**no**"}.get(r.get("meets"), "**no**")
        out.append(f"| {r['family']} | {r['model']}{' (req)' if r['required'] else ''} | {shape} | {r['status']} | "
                   f"{r.get('method', '-')} | {r.get('cuts', '-')} | {r.get('boundary', '-')} | "
                   f"{fmt_diff(r.get('max_abs_diff'))} | {meets} | {r['wall_s']:.1f} | {note} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="four models only (smoke run)")
    parser.add_argument("--models", help="comma-separated timm names instead of the built-in lists")
    parser.add_argument("--timeout", type=float, default=240.0, help="per-model limit in seconds")
    args = parser.parse_args(argv)
    os.environ.setdefault("DERY_CACHE_DIR", str(Path(tempfile.gettempdir()) / "bench-cache"))
    os.environ.setdefault("DERY_QUIET", "1")
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=FutureWarning)
    started = time.perf_counter()

    import dery.data
    import dery.models
    import timm
    from dery.zoo import native_resolution, parse_zoo

    # inspect_json rebuilds the whole digits set at the model's resolution on every call (only to
    # pass it to load_member, which does not read it for random weights); build it once per size.
    build_times: dict[int, float] = {}
    plain_digits = dery.data.digits

    @functools.cache
    def digits_once(resolution: int, **kw: int) -> dery.data.Dataset:
        t0 = time.perf_counter()
        d = plain_digits(resolution, **kw)
        build_times[resolution] = time.perf_counter() - t0
        return d

    dery.data.digits = digits_once

    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    else:
        wanted = list(QUICK if args.quick else (*REQUIRED, *SWEEP))
    missing = [m for m in wanted if not timm.is_model(m)]
    names = [m for m in wanted if timm.is_model(m)]
    fam = families(names)
    rows = []
    for i, name in enumerate(names):
        dery.data.digits(native_resolution(parse_zoo(f"{name}:random")), probe=8)  # outside the timing
        row = inspect_one(name, args.timeout)
        row.update(family=fam[name], required=name in REQUIRED)
        rows.append(row)
        print(f"[{i + 1}/{len(names)}] {name}: {row['status']} {row.get('method', '')} cuts={row.get('cuts')} "
              f"diff={fmt_diff(row.get('max_abs_diff'))} {row['wall_s']:.1f}s {row.get('error') or ''}",
              file=sys.stderr, flush=True)
        gc.collect()

    req = [r for r in rows if r["required"]]
    sweep = [r for r in rows if not r["required"]]
    info = machine()
    info["load_avg_end"] = os.getloadavg()
    total = time.perf_counter() - started
    summary = {
        "required_meeting": sum(bool(r.get("meets")) for r in req), "required_run": len(req),
        "sweep_meeting": sum(bool(r.get("meets")) for r in sweep), "sweep_run": len(sweep),
        "sweep_lowered": sum(r["status"] == "ok" for r in sweep),
        "fallback": sorted(r["model"] for r in rows if r.get("method") == "feature_info"),
        "errors": sorted(r["model"] for r in rows if r["status"] == "error"),
        "timeouts": sorted(r["model"] for r in rows if r["status"] == "timeout"),
        "few_cuts": sorted(r["model"] for r in rows if r["status"] == "ok" and r["cuts"] < MIN_CUTS),
        "large_diff": sorted(r["model"] for r in rows if r["status"] == "ok" and r["max_abs_diff"] > MAX_DIFF),
        "not_in_timm": missing,
    }
    command = "/work/venv/bin/python benchmarks/bench_inspect.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:]
                                                                      else "")
    md = [
        "# `dery inspect` across timm families (`benchmarks/bench_inspect.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu']}, {info['cores_usable']} usable cores (shared with other work; load average "
        f"{info['load_avg_start'][0]:.1f} at start, {info['load_avg_end'][0]:.1f} at end), torch "
        f"{info['torch']} ({info['torch_threads']} threads), timm {info['timm']}, numpy {info['numpy']}, Python "
        f"{info['python']}. Mode: {'quick' if args.quick else 'full'}; total run {total / 60:.1f} min; "
        f"per-model limit {args.timeout:g} s.",
        "",
        f"Each row: `dery.driver.inspect_json('<model>:random')` (seeded random weights, the model's native input "
        f"size): cut points, boundary cuts (feature maps/tokens before the head), method, max |blockwise - "
        f"whole| over the logits of two random images, wall time. Meets = >= {MIN_CUTS} cut points and "
        f"max_abs_diff <= {MAX_DIFF:g}. Wall time excludes building the digits data set (inspect_json rebuilds "
        f"all 1,797 images at the model's resolution on every call; here it is built once per resolution: "
        + ", ".join(f"{k} px {v:.1f} s" for k, v in sorted(build_times.items())) + ").",
        "",
        "## Summary",
        "",
        f"- required networks meeting the bar: {summary['required_meeting']} / {summary['required_run']}",
        f"- other families: {summary['sweep_lowered']} / {summary['sweep_run']} lower without error, "
        f"{summary['sweep_meeting']} / {summary['sweep_run']} meet the bar",
        f"- feature_info fallback: {', '.join(summary['fallback']) or 'none'}",
        f"- errors: {', '.join(summary['errors']) or 'none'}",
        f"- timeouts: {', '.join(summary['timeouts']) or 'none'}",
        f"- fewer than {MIN_CUTS} cuts: {', '.join(summary['few_cuts']) or 'none'}",
        f"- max_abs_diff > {MAX_DIFF:g}: {', '.join(summary['large_diff']) or 'none'}",
        f"- not in the installed timm: {', '.join(missing) or 'none'}",
        "",
        "## Per model (sorted by family; (req) = required by the issue)",
        "",
        *table(rows),
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inspect.md").write_text("\n".join(md) + "\n")
    doc = {"command": command, "machine": info, "mode": "quick" if args.quick else "full", "timeout_s": args.timeout,
           "min_cuts": MIN_CUTS, "max_diff": MAX_DIFF, "digits_build_s": build_times, "total_s": total,
           "summary": summary, "rows": rows}
    (RESULTS / "inspect.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print("\n".join(md[md.index("## Summary"):md.index("## Per model (sorted by family; (req) = required by the "
                                                           "issue)")]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    common.run(main)
