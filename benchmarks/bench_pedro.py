"""PEDRO decode throughput for 32 requests from 32 tenants, against the base model, peft IA3 and multi-LoRA.

Llama-like model from a config (no Hub), CPU, float32, one torch thread. Every forward of the model inside greedy `generate` is timed
(forward hooks on the transformers model, so PEDRO's and peft's per-layer work is included, generate's own token
selection is not); the decode step time is the median over all decode steps of several calls after a warm-up, and the
four models are timed in interleaved rounds so that a change of machine load hits them alike.

    PYTHONPATH=src python benchmarks/bench_pedro.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import xpeft
from xpeft import PedroConfig

RESULTS = Path(__file__).resolve().parent / "results" / "pedro.json"
TARGETS = ["q_proj", "v_proj", "up_proj"]


def base_model(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=512,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def model_description(args) -> str:
    """The benchmark model, as the reports name it."""
    return (
        f"LlamaForCausalLM(hidden={args.hidden}, intermediate={args.intermediate}, layers={args.layers}, heads=16, "
        f"kv_heads=8, vocab={args.vocab}), float32, CPU"
    )


def common_setup(args) -> dict:
    """The setup fields every PEDRO serving benchmark reports: model, tenants, lengths, threads, the LoRA baseline."""
    return {
        "model": model_description(args),
        "tenants": args.tenants,
        "prompt_tokens": args.prompt,
        "new_tokens_timed": args.new_tokens,
        "repeats": args.repeats,
        "torch_threads": args.threads,
        "lora": f"r=8 on {TARGETS}, unmerged, adapter_names over {args.tenants} adapters",
        "quick": args.quick,
    }


def perturb(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad or "pedro_" in name or "lora_" in name or "ia3_" in name:
                param.add_(0.01 * torch.randn(param.shape, generator=generator))


def trainable(model, adapter: str) -> int:
    """Parameters of one adapter (all layers)."""
    return sum(p.numel() for n, p in model.named_parameters() if f".{adapter}." in n or n.endswith(f".{adapter}"))


def build(args):
    models, params = {}, {}
    models["base"] = base_model(args)

    ia3 = get_peft_model(base_model(args), IA3Config(task_type="CAUSAL_LM"))  # peft's Llama defaults
    perturb(ia3, 1)
    models["ia3_single"], params["ia3"] = ia3.eval(), trainable(ia3, "default")

    lora = get_peft_model(base_model(args), LoraConfig(r=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    for i in range(1, args.tenants):
        lora.add_adapter(f"t{i}", LoraConfig(r=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    perturb(lora, 2)
    models["lora_multi"], params["lora_r8"] = lora.eval(), trainable(lora, "default")

    pedro = get_peft_model(base_model(args), PedroConfig(task_type="CAUSAL_LM"))
    for i in range(1, args.tenants):
        pedro.add_adapter(f"t{i}", PedroConfig(task_type="CAUSAL_LM"))
    perturb(pedro, 3)
    models["pedro_multi"], params["pedro"] = pedro.eval(), trainable(pedro, "default")
    return models, params


class StepTimer:
    """Wall and CPU time of every forward of the transformers model: the first one of a generate call is the prefill.

    The machine is shared, so wall time includes the time this process waits for a core; with one torch thread the
    process CPU time measures the work itself. Both are reported; the ratios use CPU time.
    """

    def __init__(self, model) -> None:
        self.durations: list[tuple[float, float]] = []
        model.register_forward_pre_hook(self.start)
        model.register_forward_hook(self.stop)

    def start(self, module, args) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def stop(self, module, args, output) -> None:
        wall, cpu = self._start
        self.durations.append((time.perf_counter() - wall, time.process_time() - cpu))


def timed_generate(
    model, timer: StepTimer, inputs, new_tokens: int, adapter_names, num_beams: int = 1
) -> tuple[tuple, list[tuple]]:
    """Prefill time and the decode step times of one generate call (greedy, or beam search with `num_beams`)."""
    kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
    if num_beams > 1:
        kwargs.update(num_beams=num_beams, early_stopping=False)
    timer.durations.clear()
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs
        )
    assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    assert len(timer.durations) == new_tokens
    return timer.durations[0], timer.durations[1:]


def interleaved_rounds(runs: dict, new_tokens: int, repeats: int) -> tuple[dict, dict]:
    """`(prefill, decode)` step durations per model: a warm-up call each, then `repeats` rounds that call every model's
    `runs[key](new_tokens)` in turn, so that a change of machine load hits every model alike."""
    prefill, decode = {key: [] for key in runs}, {key: [] for key in runs}
    for run in runs.values():
        run(3)
    for _ in range(repeats):
        for key, run in runs.items():
            first, steps = run(new_tokens + 1)
            prefill[key].append(first)
            decode[key].extend(steps)
    return prefill, decode


def step_summary(prefill: list[tuple], decode: list[tuple], batch: int) -> dict:
    """Median decode step (CPU and wall time), the decode throughput of `batch` requests, and the median prefill."""
    cpu = statistics.median(c for _, c in decode)
    wall = statistics.median(w for w, _ in decode)
    return {
        "decode_step_cpu_median_s": cpu,
        "decode_tokens_per_cpu_s": batch / cpu,
        "decode_step_wall_median_s": wall,
        "decode_tokens_per_wall_s": batch / wall,
        "prefill_wall_median_s": statistics.median(w for w, _ in prefill),
        "prefill_cpu_median_s": statistics.median(c for _, c in prefill),
        "decode_steps_timed": len(decode),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run to check the script (figures not reported)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.hidden, args.intermediate, args.vocab, args.tenants = 1024, 2816, 8192, 32
    args.layers, args.prompt, args.new_tokens, args.repeats = (2, 16, 4, 2) if args.quick else (4, 32, 12, 8)
    torch.set_num_threads(args.threads)

    models, params = build(args)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, args.vocab, (args.tenants, args.prompt), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::4, : args.prompt // 4] = 0  # a quarter of the requests are shorter (left padding)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    names = {
        "base": None,
        "ia3_single": None,
        "lora_multi": ["default"] + [f"t{i}" for i in range(1, args.tenants)],
        "pedro_multi": ["default"] + [f"t{i}" for i in range(1, args.tenants)],
    }
    timers = {key: StepTimer(model.get_base_model() if key != "base" else model) for key, model in models.items()}
    runs = {
        key: lambda tokens, key=key: timed_generate(models[key], timers[key], inputs, tokens, names[key])
        for key in models
    }
    prefill, decode = interleaved_rounds(runs, args.new_tokens, args.repeats)
    results = {key: step_summary(prefill[key], decode[key], args.tenants) for key in models}
    ratios = {}
    for clock in ("cpu", "wall"):
        pedro, base, lora, ia3 = (
            results[k][f"decode_tokens_per_{clock}_s"] for k in ("pedro_multi", "base", "lora_multi", "ia3_single")
        )
        ratios[f"pedro_vs_multi_lora_throughput_{clock}"] = pedro / lora
        ratios[f"pedro_vs_base_decode_time_{clock}"] = base / pedro
        ratios[f"pedro_vs_ia3_decode_time_{clock}"] = ia3 / pedro
    targets = {
        "throughput >= 1.5x multi-LoRA (cpu time)": ratios["pedro_vs_multi_lora_throughput_cpu"] >= 1.5,
        "decode time <= 1.15x base (cpu time)": ratios["pedro_vs_base_decode_time_cpu"] <= 1.15,
    }
    report = {
        "setup": {
            **common_setup(args),
            "batch": args.tenants,
            "ia3": "peft defaults for Llama (k_proj, v_proj, down_proj), single adapter",
            "pedro": f"defaults (vg_rank=12, attention pooler, rational) on {TARGETS}, adapter_names over "
            f"{args.tenants} adapters",
        },
        "environment": {
            "uptime": os.popen("uptime").read().strip(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "xpeft": xpeft.__version__,
        },
        "trainable_params_per_adapter": params,
        "results": results,
        "ratios": ratios,
        "targets_met": targets,
    }
    for key, value in results.items():
        cpu_ms, wall_ms = 1e3 * value["decode_step_cpu_median_s"], 1e3 * value["decode_step_wall_median_s"]
        tokens = value["decode_tokens_per_cpu_s"]
        print(f"{key:12s} decode {tokens:7.1f} tok/cpu-s  step {cpu_ms:7.2f} cpu-ms, {wall_ms:7.2f} wall-ms")
    for key, value in ratios.items():
        print(f"{key:40s} {value:6.3f}")
    print("trainable params per adapter:", params)
    print("targets met:", targets)
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
