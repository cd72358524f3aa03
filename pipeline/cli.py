"""Command line: `dery-compile` and `dery <subcommand>`.

User errors print one line on stderr and exit 2 (bad usage) or 1 (failed
run); bugs print their traceback and ask for a report (exit 1); --debug
re-raises every error with its traceback. Interrupting a run loses nothing that was
finished: caches and profile records are written as they are made.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import defaults
from .errors import FAILED, USAGE, DeryError

if TYPE_CHECKING:
    from .driver import CompileConfig



def _argument(convert: Callable[[str], float], ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """An argparse type: `convert` the text, then insist on `ok`, naming `what` was expected."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


positive_ms = _argument(float, lambda v: 0 < v < float("inf"), "a positive, finite number of milliseconds")
positive_int = _argument(int, lambda v: v >= 1, "a whole number >= 1")
non_negative_int = _argument(int, lambda v: v >= 0, "a whole number >= 0")
non_negative = _argument(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")


def _data_arg(p: argparse.ArgumentParser) -> None:
    embedded = ", ".join(defaults.EMBEDDED_DATA)
    p.add_argument("--data", help=f"data to probe, train and evaluate on: an embedded set ({embedded}; generated, "
                                  "nothing downloaded) or an ImageFolder directory (default: the set the zoo's "
                                  "members were trained on, glyphs for the default zoo; digits otherwise)")


def _zoo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo", help="comma-separated zoo: a preset (default), timm names (pretrained), NAME:random, "
                                 "NAME=CHECKPOINT or a dery checkpoint file (default: the embedded zoo)")
    _data_arg(p)
    p.add_argument("--k", type=positive_int, default=defaults.K,
                   help=f"blocks per network = equivalence sets (default {defaults.K})")
    p.add_argument("--balance", choices=defaults.BALANCES, default=defaults.BALANCE,
                   help=f"what block-size balance is measured in (default {defaults.BALANCE})")
    p.add_argument("--partition-slack", dest="slack", type=non_negative, default=defaults.SLACK,
                   help=f"each block holds at most (1+slack)/K of its network's cost (default {defaults.SLACK})")
    p.add_argument("--similarity", choices=defaults.SIMILARITIES, default=defaults.SIMILARITY,
                   help=f"CKA on pooled features (DeRy) or full feature maps (default {defaults.SIMILARITY})")
    p.add_argument("--probe", type=positive_int, default=defaults.PROBE,
                   help=f"probe images for similarity and stitches (default {defaults.PROBE})")
    p.add_argument("--seed", type=int, default=defaults.SEED, help=f"seed for data splits (default {defaults.SEED})")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _compile_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--target", required=True, help="deployment target: cpu, a100, h100, h200 (see `dery targets`)")
    p.add_argument("--latency-ms", dest="latency_ms", type=positive_ms, required=True,
                   help="latency budget of the compiled engine in milliseconds (hard constraint)")
    _zoo_args(p)
    p.add_argument("--out", type=Path, default=Path(defaults.OUT), help=f"output directory (default {defaults.OUT}/)")
    p.add_argument("--rerun", action="store_true",
                   help="run every stage again even when the same command and inputs already finished (each stage "
                        "is still served from its own cache); the new outputs replace the run cache's")
    p.add_argument("--classes", help="compile a classifier for these classes only (comma-separated indices or "
                                     "names): every member takes part whole and as its Model LEGO component")
    p.add_argument("--params-limit", type=non_negative, help="optional upper bound on parameters")
    p.add_argument("--flops-limit", type=non_negative, help="optional upper bound on FLOPs")
    p.add_argument("--memory-limit-mb", type=non_negative,
                   help="optional upper bound on peak activation memory (MB) of every block and stitch")
    p.add_argument("--predictor", choices=defaults.PREDICTORS,
                   help=f"quality model used as the program's objective (default {defaults.REPAIR_PREDICTOR} when "
                        f"a repair follows, {defaults.PREDICTOR} with --finetune none)")
    p.add_argument("--rerank", choices=defaults.PROXIES, default=defaults.RERANK,
                   help=f"whole-network proxy that re-ranks the program's best solutions (default {defaults.RERANK})")
    p.add_argument("--finetune", choices=defaults.FINETUNES, default=defaults.FINETUNE,
                   help="repair the best candidates before the engine is built: train nothing, the stitches, the "
                        "whole network (e2e), or by module incubation; every member compared with gets the same "
                        f"(default {defaults.FINETUNE})")
    p.add_argument("--epochs", type=non_negative_int, default=defaults.FINETUNE_EPOCHS,
                   help=f"epochs of that repair on the train split (default {defaults.FINETUNE_EPOCHS}; 0: none)")
    p.add_argument("--top", type=positive_int, default=defaults.TOP,
                   help=f"how many best solutions to re-rank (default {defaults.TOP})")
    p.add_argument("--measure", choices=defaults.MEASURES, default=defaults.MEASURE,
                   help="measure the joints and triples the best solutions rest on, or every one first "
                        f"(default {defaults.MEASURE}; both give the same answer)")
    p.add_argument("--max-rounds", type=positive_int, default=defaults.MAX_ROUNDS,
                   help=f"closed-loop rounds at most (default {defaults.MAX_ROUNDS})")
    p.add_argument("--save-problem", type=Path, help="also write the solved search problem (dery.problem/1)")
    p.add_argument("--pareto", action="store_true", help="also solve a sweep of budgets and plot them")
    p.add_argument("--allow-estimates", action="store_true",
                   help="for a target whose device is not here: use estimated latencies (flagged in the report) "
                        "and write the ONNX to build on the target")
    _common(p)
    return p


def _config(args: argparse.Namespace):
    from .driver import CompileConfig

    return CompileConfig(target=args.target, latency_ms=args.latency_ms, zoo=args.zoo, data=args.data, out=args.out,
                         classes=args.classes, k=args.k, balance=args.balance, slack=args.slack,
                         similarity=args.similarity,
                         probe=args.probe, predictor=args.predictor, rerank=args.rerank, top=args.top,
                         params_limit=args.params_limit, flops_limit=args.flops_limit,
                         memory_limit_mb=args.memory_limit_mb, max_rounds=args.max_rounds,
                         finetune=args.finetune, epochs=args.epochs, measure=args.measure,
                         save_problem=args.save_problem, pareto=args.pareto, allow_estimates=args.allow_estimates,
                         seed=args.seed)


def cmd_compile(args: argparse.Namespace) -> int:
    from . import progress, runs

    key = runs.run_key(args) if runs.cacheable(args) else None
    report = runs.recall(key, args.out) if key is not None and not args.rerun else None
    if report is not None:
        progress.say(f"same command and inputs as a finished run: its outputs are copied from the run cache "
                     f"({runs.entry(key)}); --rerun runs every stage again")
    else:
        from .driver import run_compile

        report = run_compile(_config(args))
        if key is not None and report["status"] == "ok":
            runs.remember(key, args.out, report, replace=args.rerun)
    acc = report["accuracy"]
    measured = report["measured_latency_ms"]
    print(f"{report['status'].split(':')[0]}: {args.out / report['engine']} "
          + (f"measures {measured:.4g} ms" if measured is not None else "was not measured (no device here)")
          + f" (budget {report['budget_ms']:g} ms, predicted {report['predicted_latency_ms']:.4g} ms)"
          + (f", test accuracy {100 * acc:.1f}%" if acc is not None else "")
          + f"; assembly {' > '.join(b['model'] for b in report['assembly'])}; report {args.out / 'report.md'}")
    if report["status"] != "ok":
        print(f"dery: {report['status']}", file=sys.stderr)
    return 0 if report["status"] == "ok" or report["status"].startswith("estimated") else FAILED


def cmd_solve(args: argparse.Namespace) -> int:
    from .solver import solve_file

    code, out, err = solve_file(str(args.problem), args.time_limit)
    if out:
        print(out)
    if err:
        print(f"dery solve: {err}", file=sys.stderr)
    return code


def cmd_inspect(args: argparse.Namespace) -> int:
    from .driver import inspect_json

    doc = inspect_json(args.model)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        if doc["warning"]:
            print(f"warning: {doc['warning']}", file=sys.stderr)
        print(f"{doc['model']}: {len(doc['cut_points'])} cut points (input {'x'.join(map(str, doc['input_shape']))}; "
              f"* = may bound a block)")
        for c in doc["cut_points"]:
            mark, shape = "*" if c["boundary"] else " ", "x".join(map(str, c["shape"]))
            print(f"  {mark} {c['name']:40s} {c['layout']:5s} {shape}")
        print(f"block-by-block vs whole network: max |diff| = {doc['max_abs_diff']:.3g}")
    return 0


def _front_config(args: argparse.Namespace, target: str) -> CompileConfig:
    """The CompileConfig of a command that runs a prefix of the pipeline (no budget: nothing is solved)."""
    from .driver import CompileConfig

    return CompileConfig(target=target, latency_ms=1.0, zoo=args.zoo, data=args.data, k=args.k, balance=args.balance,
                         slack=args.slack, similarity=args.similarity, probe=args.probe, seed=args.seed,
                         measure="all")


def cmd_partition(args: argparse.Namespace) -> int:
    from .driver import front
    from .passes.partition import partition_json

    doc = partition_json(front(_front_config(args, "cpu"), until="partition").partition)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(f"K={doc['k']} balanced by {doc['balance']}, objective {doc['objective']:.4f} ({doc['status']})")
        for m in doc["models"]:
            print(f"  {m['model']}: " + " | ".join(m["boundaries"]))
    return 0


def cmd_train_zoo(args: argparse.Namespace) -> int:
    from .zoo import remake_shipped

    for path in remake_shipped(args.output):
        print(f"{path} {path.stat().st_size / 1e6:.1f} MB")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .driver import front
    from .profile_store import merge_tables

    if args.merge:
        if args.output is None:
            raise DeryError("--merge needs -o/--output FILE for the merged table", exit_code=USAGE)
        summary = merge_tables(list(args.merge), args.output)
        print(f"merged {summary['inputs']} tables: {summary['records']} records, "
              f"{summary['calibration_points']} calibration points -> {args.output}")
        return 0
    if args.target is None:
        raise DeryError("dery profile needs --target (or --merge A.json B.json -o C.json)", exit_code=USAGE)
    s = front(_front_config(args, args.target), until="calibrate")
    print(f"{s.target.name}: measured {s.costs.measured} pieces, reused {s.costs.reused} from {s.store.path}; "
          f"calibration: {s.calibration.describe()}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .passes.verify import bench

    doc = bench(args.engine)
    check = doc["output_check"]
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{doc['engine']}: {doc['backend']} {doc['backend_version']} on {doc['target']} ({doc['precision']}): "
              f"median {doc['median_ms']:.4g} ms, p90 {doc['p90_ms']:.4g} ms, cv {doc['cv']:.2f}, {doc['runs']} runs"
              + (f" (recorded at build: {doc['recorded_ms']:.4g} ms)" if doc["recorded_ms"] else ""))
        print(f"outputs vs the compiled network: {check['kind']} error {check['error']:.3g} "
              f"(tolerance {check['tolerance']:g}) -> {'ok' if check['ok'] else 'MISMATCH'}")
    return 0 if check["ok"] else FAILED


def cmd_targets(args: argparse.Namespace) -> int:
    from .backends import availability
    from .targets import registry

    for t in registry().values():
        device, reason = availability(t)
        state = f"available ({device})" if reason is None else f"unavailable: {reason}"
        print(f"{t.name:6s} {t.backend:12s} {t.precision:5s} {state}  - {t.description}")
    return 0


def cmd_disassemble(args: argparse.Namespace) -> int:
    from .passes.disassemble import cmd_disassemble as run

    return run(args)


def cmd_incubate(args: argparse.Namespace) -> int:
    from .incubate_cmd import cmd_incubate as run

    return run(args)


def cmd_assemble(args: argparse.Namespace) -> int:
    from .passes.lego import cmd_assemble as run

    return run(args)


Handler = Callable[[argparse.Namespace], int]


def _dispatch(handler: Handler, args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except DeryError as e:
        if getattr(args, "debug", False):
            raise
        print(f"dery: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("dery: interrupted; finished work is cached and will be reused on the next run", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        traceback.print_exc(file=sys.stderr)
        where = next((n.strip("()") for n in getattr(e, "__notes__", []) if "dery pass" in n), "dery")
        print(f"dery: internal error in {where}: {type(e).__name__}; this is a bug in dery, please report it "
              f"with the traceback above", file=sys.stderr)
        return FAILED


def compile_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dery-compile`."""
    parser = _compile_parser(argparse.ArgumentParser(
        prog="dery-compile", description="Reassemble a zoo of pretrained networks into the most accurate network "
                                         "that meets a measured latency budget on a target, and compile it."))
    return _dispatch(cmd_compile, parser.parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dery", description="dery: hardware-aware network reassembly")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _compile_parser(sub.add_parser("compile", help="same as dery-compile"))
    p.set_defaults(handler=cmd_compile)
    p = sub.add_parser("solve", help="solve a stand-alone search problem (dery.problem/1) and print the solution")
    p.add_argument("problem", type=Path)
    p.add_argument("--time-limit", type=non_negative, help="seconds; the incumbent is returned with its gap")
    _common(p)
    p.set_defaults(handler=cmd_solve)
    p = sub.add_parser("inspect", help="list a network's cut points and check block-by-block execution")
    p.add_argument("model", help="a timm name (random weights are used: structure only) or NAME=CHECKPOINT")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(handler=cmd_inspect)
    p = sub.add_parser("partition", help="partition a zoo into K equivalence sets (exact)")
    _zoo_args(p)
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(handler=cmd_partition)
    p = sub.add_parser("profile", help="measure every missing latency record of a zoo on a target; or merge tables")
    p.add_argument("--target", help="target to measure (its device must be this machine's)")
    _zoo_args(p)
    p.add_argument("--merge", nargs="+", type=Path, metavar="TABLE", help="profile tables to merge")
    p.add_argument("-o", "--output", type=Path, help="where --merge writes the merged table")
    _common(p)
    p.set_defaults(handler=cmd_profile)
    p = sub.add_parser("bench", help="load and time an engine dery made, checking its outputs")
    p.add_argument("engine", type=Path)
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(handler=cmd_bench)
    p = sub.add_parser("disassemble", help="extract the component of one network for some classes (Model LEGO)")
    p.add_argument("model", help="one zoo member: a default-zoo name (e.g. resnet_wide), a dery checkpoint, "
                                 "NAME=CHECKPOINT or a timm name")
    p.add_argument("--classes", required=True, help="comma-separated class indices or names to keep")
    p.add_argument("-o", "--output", type=Path, required=True, help="component checkpoint to write (.pt)")
    _data_arg(p)
    p.add_argument("--seed", type=int, default=defaults.SEED, help=f"seed for data splits (default {defaults.SEED})")
    for kind, t, value in (("conv", "alpha", defaults.CONV_ALPHA), ("conv", "beta", defaults.CONV_BETA),
                           ("linear", "alpha", defaults.LINEAR_ALPHA), ("linear", "beta", defaults.LINEAR_BETA)):
        p.add_argument(f"--{kind}-{t}", dest=f"{kind}_{t}", type=float, default=value,
                       help=f"{kind} {t} threshold in [0, 1] (default {value})")
    p.add_argument("--samples", type=positive_int, default=defaults.LEGO_SAMPLES,
                   help=f"at least this many confidently correct training samples per class "
                        f"(default {defaults.LEGO_SAMPLES})")
    p.add_argument("--round-to", type=positive_int, default=defaults.LEGO_ROUND_TO,
                   help=f"keep a multiple of this many channels per dependency group, adding the largest-norm ones "
                        f"(default {defaults.LEGO_ROUND_TO}, the CPU kernels' block; 1 keeps exactly the located ones)")
    p.add_argument("--no-scale", action="store_true", help="skip parameter scaling of the logits")
    p.add_argument("--compensate", choices=defaults.LEGO_COMPENSATIONS, default=defaults.LEGO_COMPENSATE,
                   help="keep removed channels' mean contributions over the classes' training images in the next "
                        "layer's bias (on), remove them outright as MDA does (off), or keep whichever is more "
                        f"accurate on those training images (auto; default {defaults.LEGO_COMPENSATE})")
    _common(p)
    p.set_defaults(handler=cmd_disassemble)
    p = sub.add_parser("assemble", help="assemble component checkpoints into one classifier for all their classes")
    p.add_argument("parts", nargs="+", type=Path, help="component checkpoints written by `dery disassemble`")
    p.add_argument("-o", "--output", type=Path, required=True, help="assembled checkpoint to write (.pt)")
    _common(p)
    p.set_defaults(handler=cmd_assemble)
    p = sub.add_parser("incubate", help="train a network as K modules in a shared meta model (Deep Model "
                                        "Assembling), module-parallel on torchrun")
    p.add_argument("model", help="one network: a default-zoo name (e.g. resnet_wide), a dery checkpoint (an "
                                 "assembly's too: dery-compile writes its answer as assembly.pt), NAME=CHECKPOINT, "
                                 "NAME:random or a timm name")
    p.add_argument("--k", type=positive_int, default=defaults.K,
                   help=f"modules, cut at the network's balanced boundary cuts; an assembly's modules are its "
                        f"blocks, each with the stitch before it (default {defaults.K})")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="dery checkpoint to write (.pt; --zoo accepts it); the report goes to the same name .json")
    _data_arg(p)
    for stage, value in (("meta", defaults.INCUBATE_EPOCHS_META), ("module", defaults.INCUBATE_EPOCHS_MODULE),
                         ("finetune", defaults.INCUBATE_EPOCHS_FINETUNE)):
        p.add_argument(f"--epochs-{stage}", dest=f"epochs_{stage}", type=non_negative_int, default=value,
                       help=f"epochs of the {stage} stage (default {value})")
    p.add_argument("--lr", type=_argument(float, lambda v: 0 < v < 1, "a learning rate in (0, 1)"),
                   default=defaults.INCUBATE_LR, help=f"learning rate (default {defaults.INCUBATE_LR})")
    p.add_argument("--anchor", type=non_negative, default=defaults.INCUBATE_ANCHOR,
                   help=f"output anchor weight; 0 is the paper's plain incubation (default {defaults.INCUBATE_ANCHOR})")
    p.add_argument("--meta", choices=defaults.INCUBATE_METAS,
                   help=f"meta model: a tiny trained one, or the network itself frozen (default "
                        f"{defaults.INCUBATE_META}; {defaults.REPAIR_META} for an assembly, whose modules come "
                        f"pretrained)")
    p.add_argument("--nproc", type=positive_int, default=1,
                   help="processes for stage 2 under torchrun (gloo on CPU, NCCL on GPUs; default 1: in process)")
    p.add_argument("--threads", type=positive_int, help="intra-op threads per process (default: cores / nproc)")
    p.add_argument("--run-dir", type=Path, help="where the meta model and module checkpoints are kept "
                                                "(default: under the cache, keyed by the job)")
    p.add_argument("--seed", type=int, default=defaults.SEED, help=f"seed (default {defaults.SEED})")
    p.add_argument("--json", action="store_true", help="also print the report")
    _common(p)
    p.set_defaults(handler=cmd_incubate)
    p = sub.add_parser("train-zoo", help="train the default zoo afresh and write the weights dery ships")
    p.add_argument("-o", "--output", type=Path, default=defaults.SHIPPED_WEIGHTS,
                   help="directory of the shipped weights (default: the package's own, %(default)s)")
    _common(p)
    p.set_defaults(handler=cmd_train_zoo)
    p = sub.add_parser("targets", help="list targets and whether they can run here")
    _common(p)
    p.set_defaults(handler=cmd_targets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dery`."""
    args = build_parser().parse_args(argv)
    return _dispatch(args.handler, args)

