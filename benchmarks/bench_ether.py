"""Training-step time and peak memory of ETHER / ETHER+ against peft baselines, in one run (issue 4).

Same seeded Llama-like model (built from `LlamaConfig`, fp32, CPU, 'all-linear' targets) and same batch for every
method; a step is forward + backward + AdamW step. Phase 1 builds the fast methods side by side in one process and
times one step of each in turn (rotating the order), so that drifting machine load hits all of them alike; ratios
are medians of same-cycle ratios. Phase 2 runs every method alone in its own process to read its peak memory
(VmHWM from /proc/self/status, reset right after building the model; reported as peak during the steps minus RSS
after building) and to time the slow baselines (HRA, BOFT), whose targets have wide margins.

    PYTHONPATH=src python benchmarks/bench_ether.py            # full run → benchmarks/results/ether.json
    PYTHONPATH=src python benchmarks/bench_ether.py --quick    # smoke run, in-process → ether_quick.json
    PYTHONPATH=src python benchmarks/bench_ether.py --ablation # special paths on vs off → ether_special_paths.json

`--ablation` measures each of ETHER's special paths (`xpeft.ether.fused`: `block_update`, `two_sided_linear`) against
the plain torch ops that replace it when switched off (`fused.plain_paths(...)`, or the environment variable
`XPEFT_ETHER_PLAIN=block_update,two_sided_linear` / `all`): the same methods with and without the path, interleaved in
one process (step time) and each alone in its own process (peak memory), LoRA r=8 alongside for scale.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"

FULL = {"hidden": 1024, "intermediate": 2816, "layers": 2, "heads": 16, "vocab": 8192, "batch": 4, "seq": 256}
QUICK = {"hidden": 256, "intermediate": 512, "layers": 1, "heads": 4, "vocab": 1024, "batch": 2, "seq": 32}

# Timed side by side in one process (see `run_interleaved`). "ether_dense" is the official code's approach (dense
# block-diagonal H built and multiplied into W on every step), written below as the reference ETHER must beat by 2x.
FAST = (
    "lora_r8",
    "oft",
    "full_ft",
    "ether_dense",
    "ether_weight_blocks",
    "ether",
    "ether_plus",
    "ether_plus_one_sided",
)
# peft methods that rebuild a d×d weight every step: timed alone, each in its own process.
SLOW = ("boft", "hra_r8", "hra_r1")
# --ablation: method name → (ETHER method, special paths switched off for it).
ABLATION = {
    "ether": ("ether", ()),
    "ether-plain_block_update": ("ether", ("block_update",)),
    "ether_plus": ("ether_plus", ()),
    "ether_plus-plain_two_sided_linear": ("ether_plus", ("two_sided_linear",)),
    "ether_plus-plain_all": ("ether_plus", ("block_update", "two_sided_linear")),
    "ether_plus_one_sided": ("ether_plus_one_sided", ()),
    "ether_plus_one_sided-plain_block_update": ("ether_plus_one_sided", ("block_update",)),
}
# --ablation: (special path, with it, without it) compared.
ABLATION_PAIRS = (
    ("block_update", "ether", "ether-plain_block_update"),
    ("block_update", "ether_plus_one_sided", "ether_plus_one_sided-plain_block_update"),
    ("two_sided_linear", "ether_plus", "ether_plus-plain_two_sided_linear"),
    ("both", "ether_plus", "ether_plus-plain_all"),
)
N_BLOCKS = 32  # EtherConfig's default (the paper's best practice)


def build_model(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        max_position_embeddings=shape["seq"],
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


class DenseEtherLinear(nn.Module):
    """Reference ETHER on the weight side: `F.linear(x, W H)` with `H` rebuilt every forward.

    `blockwise=False`: `H = blockdiag(I − 2û_bû_bᵀ)` materialized as a d×d matrix and multiplied into `W` (the
    "dense-matrix ETHER" of issue 4, like peft's HRA). `blockwise=True`: the official code's cheaper form, the n
    `d/n × d/n` blocks multiplied into the matching column blocks of `W` (no d×d matrix, but still a new `W` per step,
    whose gradient then costs as much as full fine-tuning's).
    """

    def __init__(self, base: nn.Linear, n_blocks: int, blockwise: bool):
        super().__init__()
        self.base = base
        self.blockwise = blockwise
        self.u = nn.Parameter(torch.randn(n_blocks, base.in_features // n_blocks))

    def forward(self, x):
        u = self.u / self.u.norm(dim=-1, keepdim=True)
        n, size = u.shape
        blocks = torch.eye(size, device=x.device, dtype=x.dtype) - 2 * u.unsqueeze(-1) * u.unsqueeze(-2)
        weight = self.base.weight
        if self.blockwise:
            weight = torch.einsum("fnm,nmk->fnk", weight.unflatten(1, (n, size)), blocks).flatten(1)
        else:
            weight = weight @ torch.block_diag(*blocks)
        return F.linear(x, weight, self.base.bias)


def apply_dense_ether(model, n_blocks: int, blockwise: bool):
    model.requires_grad_(False)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name != "lm_head":
                setattr(module, child_name, DenseEtherLinear(child, n_blocks, blockwise))
    return model


def prepare(method: str, model):
    """Wrap `model` for `method`; returns the module to train."""
    import peft

    import xpeft  # noqa: F401  (registers the "ether" peft type)

    target = "all-linear"
    configs = {
        "lora_r8": lambda: peft.LoraConfig(r=8, target_modules=target),
        "oft": lambda: peft.OFTConfig(target_modules=target),
        "boft": lambda: peft.BOFTConfig(target_modules=target),
        "hra_r8": lambda: peft.HRAConfig(r=8, target_modules=target),
        "hra_r1": lambda: peft.HRAConfig(r=1, target_modules=target),
        "ether": lambda: xpeft.EtherConfig(target_modules=target, n_blocks=N_BLOCKS, variant="ether"),
        "ether_plus": lambda: xpeft.EtherConfig(target_modules=target, n_blocks=N_BLOCKS, variant="ether_plus"),
        "ether_plus_one_sided": lambda: xpeft.EtherConfig(
            target_modules=target, n_blocks=N_BLOCKS, variant="ether_plus_one_sided"
        ),
    }
    if method == "full_ft":
        return model
    if method in ("ether_dense", "ether_weight_blocks"):
        return apply_dense_ether(model, N_BLOCKS, blockwise=method == "ether_weight_blocks")
    return peft.get_peft_model(model, configs[method]())


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> float:
    """Reset the process's peak RSS (VmHWM) to its current RSS and return it, in MB.

    `getrusage().ru_maxrss` cannot be used: Linux carries it over from the parent across fork + exec, so every child
    would report the benchmark parent's peak. VmHWM belongs to the process's own address space.
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # "5" resets the peak RSS counter (Linux >= 4.0)
    return _status_mb("VmRSS")


def make_step(method: str, shape: dict):
    """Build `method`'s model, optimizer and batch; return `(step, trainable_params)` where `step()` trains once."""
    from xpeft.ether import fused

    method, plain = ABLATION.get(method, (method, ()))
    model = prepare(method, build_model(shape)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=generator)

    def step() -> float:
        with fused.plain_paths(*plain) if plain else contextlib.nullcontext():
            start = time.perf_counter()
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

    return step, sum(p.numel() for p in params)


def run_one(method: str, shape: dict, warmup: int, steps: int, threads: int) -> dict:
    """One method alone (its own process in a full run): peak memory, and step time for the slow methods."""
    torch.set_num_threads(threads)
    return measure_alone(*make_step(method, shape), warmup, steps)


def measure_alone(step: Callable[[], float], n_params: int, warmup: int, steps: int) -> dict:
    """Step times and peak memory (VmHWM, reset just before the steps) of one built method's `step`."""
    rss_before = reset_peak_rss()
    times = [step() for _ in range(warmup + steps)][warmup:]
    peak = _status_mb("VmHWM")
    return {
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "trainable_params": n_params,
        "peak_rss_mb": peak,
        "peak_rss_increase_mb": peak - rss_before,
    }


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_interleaved(steps: dict[str, Callable[[], float]], warmup: int, cycles: int) -> tuple[dict, dict]:
    """Step times of methods built side by side in one process (`steps`: name → one timed training step), one step
    each in turn (order rotated per cycle), so that a change in machine load hits every method alike. Returns
    per-method step times and minor page faults per step (fresh pages the allocator took from the OS: each costs a
    fault and zeroing, inside the step time)."""
    methods = list(steps)
    times: dict[str, list[float]] = {method: [] for method in methods}
    faults: dict[str, list[int]] = {method: [] for method in methods}
    for cycle in range(warmup + cycles):
        order = methods[cycle % len(methods) :] + methods[: cycle % len(methods)]
        for method in order:
            faults_before = _minor_faults()
            elapsed = steps[method]()
            if cycle >= warmup:
                times[method].append(elapsed)
                faults[method].append(_minor_faults() - faults_before)
        if cycle >= warmup:
            print(f"  cycle {cycle - warmup + 1}/{cycles}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in methods))
    return times, faults


def same_cycle_ratio(times: dict[str, list[float]], method: str, baseline: str) -> float:
    """Median over cycles of `method`'s step time over `baseline`'s in the same cycle: robust to load that drifts
    between cycles."""
    return statistics.median(a / b for a, b in zip(times[method], times[baseline], strict=True))


def same_cycle_ratio_interval(
    times: dict[str, list[float]], method: str, baseline: str, resamples: int = 4000
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of [`same_cycle_ratio`]: the cycles' ratios resampled with replacement (fixed
    seed). A limit inside the interval is a difference the run cannot tell from noise."""
    cycle_ratios = [a / b for a, b in zip(times[method], times[baseline], strict=True)]
    draw = random.Random(0)
    medians = sorted(statistics.median(draw.choices(cycle_ratios, k=len(cycle_ratios))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def verdict(ratio: float, interval: tuple[float, float] | None, limit: float) -> str:
    """MET when the median ratio is within `limit` (its interval may still reach past it: the report gives both);
    LEVEL when the median is not but the interval reaches the limit (the run cannot tell the two apart); MISSED
    otherwise."""
    if ratio <= limit:
        return "MET"
    return "LEVEL" if interval is not None and interval[0] <= limit else "MISSED"


def machine_info(load_before: tuple[float, float, float]) -> dict:
    """What a report records of the machine: cores, load before and after the run, versions, glibc settings."""
    return {
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": __import__("peft").__version__,
        "code_revision": _code_revision(),
        # glibc reads these at start-up; raising them keeps freed memory mapped (no page faults per step).
        "malloc_env": {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")},
    }


def _code_revision() -> str:
    """The git commit the benchmark ran on, with "+changes" when the working tree differed from it."""
    repo = Path(__file__).resolve().parents[1]
    git = ["git", "-C", str(repo)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+changes" if dirty.stdout.strip() else "")


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {out}")


def run_alone(args, shape: dict, methods, steps: dict[str, int]) -> dict:
    """Each method alone, in its own process in a full run (in-process with --quick): peak memory and step times."""
    alone = {}
    for method in methods:
        n_steps = steps.get(method, 1)
        if args.quick:
            alone[method] = run_one(method, shape, 1, n_steps, args.threads)
        else:
            command = [sys.executable, __file__, "--child", method, "--threads", str(args.threads)]
            command += ["--child-steps", str(n_steps), "--seq", str(shape["seq"])]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
            alone[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = alone[method]
        print(
            f"  {method:40s} params {r['trainable_params']:>11,d}  peak RSS +{r['peak_rss_increase_mb']:7.1f} MB "
            f"(abs {r['peak_rss_mb']:7.1f} MB)  alone {r['step_s_median']:.2f} s/step",
            flush=True,
        )
    return alone


def run_ablation(args, shape: dict, cycles: int) -> None:
    """Each special path of `xpeft.ether.fused` on vs off: step-time ratios (interleaved, same-cycle medians) and peak
    memory ratios (each alone), "off / on": above 1 means the path pays."""
    load_before = os.getloadavg()
    methods = ("lora_r8", *ABLATION)
    print(f"shape {shape}, {args.threads} thread(s), load {load_before}; ablation of " + ", ".join(methods))
    torch.set_num_threads(args.threads)
    steps = {method: make_step(method, shape)[0] for method in methods}
    times, _ = run_interleaved(steps, warmup=1, cycles=cycles)
    alone = run_alone(args, shape, methods, {})
    pairs = {}
    for path, on, off in ABLATION_PAIRS:
        memory_on, memory_off = (alone[m]["peak_rss_increase_mb"] for m in (on, off))
        pairs[f"{path}: {off} / {on}"] = {
            "path": path,
            "step_time_off_over_on": same_cycle_ratio(times, off, on),
            "step_time_interval_95": same_cycle_ratio_interval(times, off, on),
            "peak_rss_increase_mb_on": memory_on,
            "peak_rss_increase_mb_off": memory_off,
            "peak_memory_off_over_on": memory_off / memory_on if memory_on else None,
        }
    print("\nspecial paths, off / on (above 1: the path pays):")
    for label, pair in pairs.items():
        low, high = pair["step_time_interval_95"]
        print(
            f"  {label:70s} step {pair['step_time_off_over_on']:.3f} ({low:.3f}-{high:.3f}), "
            f"peak memory {pair['peak_memory_off_over_on'] or float('nan'):.3f}"
        )
    report = {
        "shape": shape,
        "quick": args.quick,
        "timed_cycles": cycles,
        "torch_threads": args.threads,
        "n_blocks": N_BLOCKS,
        "target_modules": "all-linear",
        "timing_method": "as in the main run: interleaved in one process, medians of same-cycle ratios",
        "memory_metric": "peak RSS increase of each method alone in its own process (in-process with --quick)",
        "machine": machine_info(load_before),
        "results": {
            method: {**alone[method], "step_s_median": statistics.median(times[method]), "step_s_all": times[method]}
            for method in methods
        },
        "ratios_to_lora_r8": {m: same_cycle_ratio(times, m, "lora_r8") for m in ABLATION},
        "special_paths": pairs,
    }
    write_report(
        report, args.out or RESULTS / ("ether_special_paths_quick.json" if args.quick else "ether_special_paths.json")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, everything in-process: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every method (default 1)")
    parser.add_argument("--cycles", type=int, default=None, help="timed interleaved cycles (default 12, quick 2)")
    parser.add_argument("--slow-steps", type=int, default=None, help="timed steps of HRA/BOFT (default 3, quick 1)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 256, quick 32)")
    parser.add_argument("--ablation", action="store_true", help="ETHER's special paths on vs off (see above)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = dict(QUICK if args.quick else FULL)
    if args.seq:
        shape["seq"] = args.seq
    cycles = args.cycles if args.cycles is not None else (2 if args.quick else 12)
    slow_steps = args.slow_steps if args.slow_steps is not None else (1 if args.quick else 3)

    if args.child:
        print(json.dumps(run_one(args.child, shape, 1, args.child_steps, args.threads)))
        return

    if args.ablation:
        run_ablation(args, shape, cycles)
        return
    load_before = os.getloadavg()
    print(f"shape {shape}, {args.threads} thread(s), load {load_before}")
    print("phase 1: interleaved step times of " + ", ".join(FAST))
    torch.set_num_threads(args.threads)
    steps = {method: make_step(method, shape)[0] for method in FAST}
    times, faults = run_interleaved(steps, warmup=1, cycles=cycles)

    print("phase 2: each method alone (peak memory; step time of " + ", ".join(SLOW) + ")")
    alone = run_alone(args, shape, FAST + SLOW, {method: slow_steps for method in SLOW})

    results = {}
    for method in FAST + SLOW:
        source = times[method] if method in FAST else alone[method]["step_s_all"]
        results[method] = {
            **alone[method],
            "step_s_median": statistics.median(source),
            "step_s_all": source,
            "timing": "interleaved (phase 1)" if method in FAST else "alone (phase 2)",
        }
        if method in FAST:
            results[method]["alone_step_s"] = alone[method]["step_s_all"]
            results[method]["minor_page_faults_per_step"] = statistics.median(faults[method])

    ratios, intervals = {}, {}
    for ether in ("ether", "ether_plus", "ether_plus_one_sided"):
        for base in FAST + SLOW:
            if base in ("ether", "ether_plus", "ether_plus_one_sided"):
                continue
            if base in FAST:
                ratios[f"{ether}/{base}"] = same_cycle_ratio(times, ether, base)
                intervals[f"{ether}/{base}"] = same_cycle_ratio_interval(times, ether, base)
            else:
                ratios[f"{ether}/{base}"] = results[ether]["step_s_median"] / results[base]["step_s_median"]

    targets = {}
    for ether, limit in {"ether": 1.15, "ether_plus": 1.3}.items():
        checks = {
            f"{ether} <= {limit}x lora_r8": ("lora_r8", limit),
            f"{ether} >= 3x faster than hra_r1": ("hra_r1", 1 / 3),
            f"{ether} >= 3x faster than hra_r8": ("hra_r8", 1 / 3),
            f"{ether} >= 3x faster than boft": ("boft", 1 / 3),
            f"{ether} no slower than oft": ("oft", 1.0),
            f"{ether} >= 2x faster than ether_dense": ("ether_dense", 0.5),
        }
        for label, (base, limit_ratio) in checks.items():
            ratio, interval = ratios[f"{ether}/{base}"], intervals.get(f"{ether}/{base}")
            targets[label] = {
                "ratio": ratio,
                "interval_95": interval,
                "limit": limit_ratio,
                "met": ratio <= limit_ratio,
                "verdict": verdict(ratio, interval, limit_ratio),
            }

    print("\nmedian step time (s):")
    for method, r in results.items():
        faults_note = f", {r['minor_page_faults_per_step']:,.0f} page faults/step" if method in FAST else ""
        print(f"  {method:22s} {r['step_s_median']:8.3f}  ({r['timing']}{faults_note})")
    print("\nratios (ETHER step time / baseline step time):")
    for key, value in ratios.items():
        interval = f"  (95% interval {intervals[key][0]:.3f}-{intervals[key][1]:.3f})" if key in intervals else ""
        print(f"  {key:36s} {value:6.3f}{interval}")
    print("\ntargets:")
    for label, value in targets.items():
        print(f"  {label:44s} {value['verdict']} ({value['ratio']:.3f}, limit {value['limit']:.3f})")

    report = {
        "shape": shape,
        "quick": args.quick,
        "timed_cycles": cycles,
        "slow_timed_steps": slow_steps,
        "torch_threads": args.threads,
        "n_blocks": N_BLOCKS,
        "target_modules": "all-linear",
        "dtype": "float32",
        "step": "forward + backward + AdamW step, causal-LM loss on one fixed batch",
        "timing_method": (
            f"{', '.join(FAST)}: built side by side in one process, one step each in turn with the order rotated, "
            f"1 warm-up cycle + {cycles} timed; ratios are medians of same-cycle ratios, with a 95% bootstrap "
            f"interval over the cycles (`ratio_intervals`). {', '.join(SLOW)}: each alone in its own process, "
            f"1 warm-up + {slow_steps} timed steps (their targets have wide margins)."
        ),
        "memory_metric": (
            "VmHWM (peak RSS, /proc/self/status) of each method's own process, reset via /proc/self/clear_refs "
            "after building the model; increase = peak during 1 warm-up + timed steps minus RSS after building"
            + (" (quick mode runs in-process: memory figures are not per method)" if args.quick else "")
        ),
        "peft_defaults": "OFTConfig() and BOFTConfig() defaults, target_modules='all-linear'",
        "machine": machine_info(load_before),
        "results": results,
        "ratios": ratios,
        "ratio_intervals": intervals,
        "targets": targets,
    }
    write_report(report, args.out or RESULTS / ("ether_quick.json" if args.quick else "ether.json"))


if __name__ == "__main__":
    main()
