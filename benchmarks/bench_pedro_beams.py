"""PEDRO in the papers' serving setting: a mixed batch of 32 tenants, greedy (beam 1) and beam search (beam 3), decode
throughput and peak memory, against peft LoRA r=8 unmerged with `adapter_names` (issue 19, item 5).

The protocol of the PEDRO group's papers: LoRA unmerged, tokens/s and peak MiB at beam 1 and 3. Same Llama-like model
from a config (no Hub), float32, CPU, one torch thread, 32 requests with one adapter each (a quarter of them shorter,
left-padded). Every forward of the model inside `generate` is timed by hooks (see `bench_pedro.StepTimer`); a decode
step advances each of the 32 requests by one token (all beams of a request together), so the throughput is
`32 / median decode step` in request tokens per CPU-second. The base model and the two adapted models are timed in
interleaved rounds, so that a change of machine load hits them alike.

Peak memory: each model and beam width in its own process (VmHWM from /proc/self/status, reset after building the
model and one warm-up call), reported as the increase during a generate call, and as the process's absolute peak.

    PYTHONPATH=src python benchmarks/bench_pedro_beams.py            # → benchmarks/results/pedro_beams.json
    PYTHONPATH=src python benchmarks/bench_pedro_beams.py --quick    # smoke run, tiny model, nothing written
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ether import _status_mb, machine_info, reset_peak_rss, write_report  # noqa: E402
from bench_pedro import (  # noqa: E402
    TARGETS,
    StepTimer,
    base_model,
    common_setup,
    interleaved_rounds,
    perturb,
    step_summary,
    timed_generate,
    trainable,
)

from xpeft import PedroConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "pedro_beams.json"
MODELS = ("base", "lora_multi", "pedro_multi")
FULL = {"hidden": 1024, "intermediate": 2816, "layers": 8, "vocab": 8192, "tenants": 32, "prompt": 32}
QUICK = {"hidden": 128, "intermediate": 256, "layers": 2, "vocab": 512, "tenants": 4, "prompt": 8}


def build_one(key: str, args) -> tuple[torch.nn.Module, int]:
    """`(model, trainable parameters per adapter)` of `key`: the base, or it with one adapter per tenant."""
    model = base_model(args)
    if key == "base":
        return model, 0
    make_config = {
        "lora_multi": lambda: LoraConfig(r=8, target_modules=TARGETS, task_type="CAUSAL_LM"),
        "pedro_multi": lambda: PedroConfig(task_type="CAUSAL_LM"),
    }[key]
    model = get_peft_model(model, make_config())
    for i in range(1, args.tenants):
        model.add_adapter(f"t{i}", make_config())
    perturb(model, {"lora_multi": 2, "pedro_multi": 3}[key])
    return model.eval(), trainable(model, "default")


def adapter_names(key: str, tenants: int) -> list[str] | None:
    return None if key == "base" else ["default"] + [f"t{i}" for i in range(1, tenants)]


def make_inputs(args) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, args.vocab, (args.tenants, args.prompt), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::4, : args.prompt // 4] = 0  # a quarter of the requests are shorter (left padding)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def time_interleaved(args, beams: int) -> dict:
    """Decode and prefill step times of every model at `beams`, timed in interleaved rounds."""
    models, params = {}, {}
    for key in MODELS:
        models[key], params[key] = build_one(key, args)
    inputs = make_inputs(args)
    timers = {key: StepTimer(m.get_base_model() if key != "base" else m) for key, m in models.items()}

    def run(key: str, new_tokens: int):
        names = adapter_names(key, args.tenants)
        return timed_generate(models[key], timers[key], inputs, new_tokens, names, num_beams=beams)

    runs = {key: partial(run, key) for key in models}
    prefill, decode = interleaved_rounds(runs, args.new_tokens, args.repeats)
    return {
        key: {**step_summary(prefill[key], decode[key], args.tenants), "trainable_params_per_adapter": params[key]}
        for key in models
    }


def peak_memory(args, key: str, beams: int) -> dict:
    """Peak RSS of one generate call of `key` at `beams`, in this process (call it in a fresh one)."""
    model, _ = build_one(key, args)
    inputs, names = make_inputs(args), adapter_names(key, args.tenants)
    timer = StepTimer(model.get_base_model() if key != "base" else model)
    timed_generate(model, timer, inputs, 3, names, num_beams=beams)  # warm-up: lazily built buffers
    rss_before = reset_peak_rss()
    start = time.perf_counter()
    timed_generate(model, timer, inputs, args.new_tokens + 1, names, num_beams=beams)
    peak = _status_mb("VmHWM")
    return {
        "peak_rss_mb": peak,
        "peak_rss_increase_mb": peak - rss_before,
        "rss_after_build_mb": rss_before,
        "generate_wall_s": time.perf_counter() - start,
    }


def peak_memory_alone(args, key: str, beams: int) -> dict:
    if args.quick:
        return peak_memory(args, key, beams)
    command = [sys.executable, __file__, "--child", key, "--beams", str(beams), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{key} at beam {beams} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(numerator: float, denominator: float) -> float | None:
    """`numerator / denominator`, None when the denominator is 0 (a tiny in-process run may not grow its peak)."""
    return numerator / denominator if denominator else None


def ratios_of(timing: dict, memory: dict) -> dict:
    pedro, lora, base = timing["pedro_multi"], timing["lora_multi"], timing["base"]
    return {
        "pedro_over_lora_throughput_cpu": pedro["decode_tokens_per_cpu_s"] / lora["decode_tokens_per_cpu_s"],
        "pedro_over_base_decode_time_cpu": pedro["decode_step_cpu_median_s"] / base["decode_step_cpu_median_s"],
        "lora_over_base_decode_time_cpu": lora["decode_step_cpu_median_s"] / base["decode_step_cpu_median_s"],
        "pedro_over_lora_peak_increase": _ratio(
            memory["pedro_multi"]["peak_rss_increase_mb"], memory["lora_multi"]["peak_rss_increase_mb"]
        ),
        "pedro_over_lora_peak_rss": memory["pedro_multi"]["peak_rss_mb"] / memory["lora_multi"]["peak_rss_mb"],
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, in-process: checks the script only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--repeats", type=int, default=None, help="timed generate calls per model (default 4)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        setattr(args, name, value)
    args.new_tokens = 3 if args.quick else 12
    args.repeats = args.repeats or (1 if args.quick else 4)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(peak_memory(args, args.child, args.beams[0])))
        return {}
    load_before, revision = os.getloadavg(), machine_info((0.0, 0.0, 0.0))["code_revision"]
    report = {
        "setup": {
            **common_setup(args),
            "pedro": f"defaults on {TARGETS}, adapter_names over {args.tenants} adapters",
            "throughput": "request tokens per CPU-second: tenants / median decode step (all beams of a request "
            "advance together)",
            "memory": "VmHWM of a fresh process per model and beam width, reset after building and one warm-up call",
        },
        "beams": {},
    }
    for beams in args.beams:
        timing = time_interleaved(args, beams)
        memory = {key: peak_memory_alone(args, key, beams) for key in MODELS}
        report["beams"][str(beams)] = {"timing": timing, "memory": memory, "ratios": ratios_of(timing, memory)}
        for key in MODELS:
            t, m = timing[key], memory[key]
            print(
                f"beam {beams} {key:12s} {t['decode_tokens_per_cpu_s']:7.1f} request tok/cpu-s, step "
                f"{1e3 * t['decode_step_cpu_median_s']:7.2f} cpu-ms; peak +{m['peak_rss_increase_mb']:7.1f} MB "
                f"(abs {m['peak_rss_mb']:7.1f} MB)",
                flush=True,
            )
        for name, value in report["beams"][str(beams)]["ratios"].items():
            print(f"  {name:36s} {value if value is None else round(value, 3)}")
    report["machine"] = {**machine_info(load_before), "code_revision": revision}  # the code that ran, not later
    if not args.quick:
        write_report(report, args.out or RESULTS)
    return report


if __name__ == "__main__":
    main()
