"""The one source of every default a user can change: argparse, CompileConfig and the passes all read it.

Torch-free, so that `--help` and `dery solve` stay light.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

K = 4  # blocks per network = equivalence sets
BALANCE = "flops"  # what block-size balance is measured in
BALANCES = ("params", "flops", "latency")
SLACK = 0.5  # each block holds at most (1 + slack) / K of its network's cost
SIMILARITY = "pooled"  # CKA on pooled features (DeRy) or full feature maps
SIMILARITIES = ("pooled", "full")
PROBE = 256  # probe images for similarity and stitches
SEED = 0
PREDICTOR = "pairwise-log"  # the program's quality model (the best Kendall tau in benchmarks/results/quality.md)
PREDICTORS = ("pairwise", "pairwise-log", "pairwise-repaired", "stitch-r2", "member-acc")
RERANK = "val-acc"  # the whole-network proxy that re-ranks the program's best solutions
PROXIES = ("val-acc", "naswot", "linear-probe")
TOP = 4  # best solutions re-ranked (each repaired first: 4-17 s apiece on the default zoo)
TERM_IMAGES = 500  # val images behind each stitch's R^2 and the quality terms (the re-ranking reads all of val)
LOSS_IMAGES = 2000  # train images a repair's loss before and after is measured on
MEASURE = "on-demand"  # what a compile measures: the pieces its solutions rest on, or "all" of them
MEASURES = ("on-demand", "all")
MAX_ROUNDS = 4  # closed-loop rounds at most
FINETUNE = "e2e"  # the repair of the chosen assembly before its engine is built (benchmarks/results/reassembly.md)
FINETUNES = ("none", "stitches", "e2e", "incubate")
FINETUNE_EPOCHS = 2  # epochs of that repair (8,000 glyphs, 250 steps), given to every member it is compared with too
# The quality model when a repair follows. `pairwise-repaired` ranks repaired assemblies best (Kendall tau 0.69
# against 0.50 in benchmarks/results/quality.md) but trains once per stitch (about 130 s on the default zoo, on
# 2 cores), which the first run cannot afford; the re-ranking after repair (tau 0.88) makes the choice.
REPAIR_PREDICTOR = "pairwise-log"
REPAIR_TERM_EPOCHS = 1  # the brief repair behind `pairwise-repaired`
# Random assemblies measured whole, besides the members, to calibrate the latency model: none. In 10 of 11 zoo
# runs of benchmarks/bench_fidelity.py the members alone predicted held-out engines as well or better than with
# 12 (on a Xeon, timm zoo: 98% against 75% within 5%), and the 12 took a fifth of the first run.
CALIBRATION_ASSEMBLIES = 0
OUT = "build"
EMBEDDED_DATA = ("glyphs", "digits")  # the data dery generates itself; `--data` takes these names or a directory
SHIPPED_WEIGHTS = Path(__file__).parent / "weights"  # the default zoo's members, trained by `dery train-zoo`

# Model LEGO (dery disassemble): alpha/beta thresholds per layer kind (the paper's), confident samples per class.
CONV_ALPHA, CONV_BETA = 0.3, 0.2
LINEAR_ALPHA, LINEAR_BETA = 0.4, 0.3
LEGO_SAMPLES = 32
# Kept channels per dependency group are rounded up to a multiple of this (the largest-norm extra ones), since
# ONNX Runtime's CPU convolutions run on 8-channel blocks (benchmarks/bench_lego.py measures 1 against 8).
LEGO_ROUND_TO = 8
# Training images of the requested classes whose mean layer inputs replace removed channels (in biases).
LEGO_MEAN_SAMPLES = 512
# Whether a component keeps removed channels' mean contributions: "auto" keeps them where that is more accurate
# on the classes' training images (it is on plain CNNs, not on every depthwise one: benchmarks/results/lego.md).
LEGO_COMPENSATE = "auto"
LEGO_COMPENSATIONS = ("auto", "on", "off")

# Deep Incubation: the weight of the output anchor (0: the paper's plain incubation; see pipeline/incubate.py),
# epochs of each stage and the learning rate (the CNN rows of benchmarks/results/incubation.md), and the meta
# model: a tiny trained one (the paper's, for `dery incubate`), or the network itself frozen around each module,
# which repairs a reassembled network's pretrained modules far better (mean 0.735 against 0.396 in
# benchmarks/results/incubation.md; end-to-end fine-tuning at the same epochs gives 0.877 there).
INCUBATE_ANCHOR = 10.0
INCUBATE_EPOCHS_META, INCUBATE_EPOCHS_MODULE, INCUBATE_EPOCHS_FINETUNE = 30, 15, 5
INCUBATE_LR = 1e-2
INCUBATE_META = "tiny"
REPAIR_META = "self"
INCUBATE_METAS = ("tiny", "self")


@dataclass(frozen=True)
class Profiling:
    """How the profile, calibrate and verify passes guard their measurements; tests pass their own."""

    chunk: int = 32  # pieces (or calibration engines) measured together; saved, and resumed, per chunk
    odd_context: float = 0.2  # a context term this large a share of its triple is measured again (real: < 10%)
    context_retries: int = 2  # more measurements of an odd context term's pieces
    slow_retries: int = 1  # more measurements of a group whose reference ran slow against the run's quickest
    calibration_off: float = 0.1  # a calibration engine this far off its in-context sum is measured again
    floor_margin: float = 0.5  # an unmeasured term's floor: this share of its largest block below its members' own
    floors: str = "own"  # "own": each unmeasured term below its members' own terms; "zoo": below the zoo's lowest
    verify_attempts: int = 3  # engine measurements, in all, before a disturbed reading is reported as noisy
    verify_off: float = 0.15  # an engine reading this far off its prediction is measured again to confirm it
