"""X-PEFT benchmark (issue 5, "Performance"): bytes per profile, a 100,000-profile store, mixed-profile inference
and profile loading, each against peft baselines measured in the same run.

    PYTHONPATH=src python benchmarks/bench_x_peft.py            # full run, writes benchmarks/results/x_peft.json
    PYTHONPATH=src python benchmarks/bench_x_peft.py --quick    # seconds-long smoke run (small sizes)
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import xpeft
from xpeft import ProfileStore, XPeftConfig, attach_profile
from xpeft.x_peft import extract_adapter, pack_masks

RESULTS = Path(__file__).resolve().parent / "results" / "x_peft.json"
# transformers 5.24 renamed the KV cache argument and output field `past_key_values` to `cache`.
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bert_base(quick: bool) -> BertModel:
    torch.manual_seed(0)
    layers, hidden = (2, 768) if quick else (12, 768)
    config = BertConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=4 * hidden)
    return BertModel(config).eval()


def folder_bytes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".json")}


def bench_bytes(tmp: Path, quick: bool) -> dict:
    """Bytes of one hard-mask profile (N=100) on BERT-base vs a full bottleneck adapter and peft LoRA r=8 (q/v)."""
    out = {}
    for mask_type in ("hard", "soft"):
        model = get_peft_model(bert_base(quick), XPeftConfig(bank_size=100, mask_type=mask_type, hard_k=1))
        model.save_pretrained(tmp / f"xpeft_{mask_type}")
        out[f"xpeft_{mask_type}"] = folder_bytes(tmp / f"xpeft_{mask_type}")
        if mask_type == "hard":
            cost = xpeft.profile_cost(model)
            single = extract_adapter(model)  # what one full bottleneck adapter of the same layers holds
            save_file({f"{n}.{p}": t for n, parts in single.items() for p, t in parts.items()}, tmp / "bottleneck.st")
            out["bottleneck_adapter_file"] = (tmp / "bottleneck.st").stat().st_size
            out["profile_cost"] = cost
    lora = get_peft_model(bert_base(quick), LoraConfig(r=8, target_modules=["query", "value"]))
    lora.save_pretrained(tmp / "lora")
    out["lora_r8_qv"] = folder_bytes(tmp / "lora")
    hard_file = out["xpeft_hard"]["adapter_model.safetensors"]
    out["payload_bytes"] = out["profile_cost"]["payload_bytes"]
    out["ratio_bottleneck_file_over_profile_file"] = out["bottleneck_adapter_file"] / hard_file
    out["ratio_lora_file_over_profile_file"] = out["lora_r8_qv"]["adapter_model.safetensors"] / hard_file
    out["ratio_bottleneck_file_over_payload"] = out["bottleneck_adapter_file"] / out["payload_bytes"]
    out["ratio_lora_file_over_payload"] = out["lora_r8_qv"]["adapter_model.safetensors"] / out["payload_bytes"]
    return out


def bench_store(tmp: Path, quick: bool) -> dict:
    """A store of P hard-mask profiles (12 layers, N=100): size on disk, random single-profile load time."""
    profiles, layers, bank_size, k = (2_000 if quick else 100_000), 12, 100, 1
    model = get_peft_model(bert_base(True), XPeftConfig(bank_size=bank_size, mask_type="hard", hard_k=k))
    config = model.peft_config["default"]
    path = tmp / "store.safetensors"
    store = ProfileStore.create(path, config, layers=layers)
    generator = torch.Generator().manual_seed(0)
    payloads = {}
    chunk = 10_000
    for start in range(0, profiles, chunk):
        n = min(chunk, profiles - start)
        logits = torch.randn(n, layers, 2, bank_size, generator=generator)
        rows = pack_masks(logits, "hard", k).view(n, -1)  # 2400 bits per profile: whole bytes, no padding
        payloads.update({f"user-{start + i:06d}": rows[i].clone() for i in range(n)})
    start = time.perf_counter()
    store.add(payloads, bank_fingerprint=config.bank_fingerprint)
    add_seconds = time.perf_counter() - start
    start = time.perf_counter()
    store = ProfileStore(path)
    open_seconds = time.perf_counter() - start
    names = store.list()
    rng = random.Random(0)
    get_times, masks_times = [], []
    for _ in range(2000):
        name = rng.choice(names)
        t0 = time.perf_counter()
        store.get(name)
        t1 = time.perf_counter()
        store.masks(name)
        masks_times.append(time.perf_counter() - t1)
        get_times.append(t1 - t0)
    return {
        "profiles": profiles,
        "file_bytes": path.stat().st_size,
        "file_megabytes": path.stat().st_size / 1e6,
        "bytes_per_profile": path.stat().st_size / profiles,
        "add_all_seconds": add_seconds,
        "open_seconds": open_seconds,
        "median_get_ms": statistics.median(get_times) * 1e3,
        "median_get_and_decode_ms": statistics.median([a + b for a, b in zip(get_times, masks_times, strict=True)])
        * 1e3,
    }


def bench_loading(tmp: Path, quick: bool) -> dict:
    """Loading one profile into a BERT-base model: X-PEFT (store / peft folder) vs peft `load_adapter` of LoRA r=8."""
    repeats = 3 if quick else 10
    lora = get_peft_model(
        bert_base(quick), LoraConfig(r=8, target_modules=["query", "value"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp / "lora_load")
    counter = iter(range(10_000))
    lora_s = median_time(lambda: lora.load_adapter(tmp / "lora_load", adapter_name=f"l{next(counter)}"), repeats)

    model = get_peft_model(bert_base(quick), XPeftConfig(bank_size=100, mask_type="hard", hard_k=1))
    model.save_pretrained(tmp / "xpeft_load")
    layers = len([m for m in model.modules() if isinstance(m, xpeft.x_peft.XPeftLayer)])
    store = ProfileStore.create(tmp / "load_store.safetensors", model.peft_config["default"], layers=layers)
    store.add(
        {f"s{i}": xpeft.x_peft.profile_payload(model) for i in range(200)},
        model.peft_config["default"].bank_fingerprint,
    )
    store = ProfileStore(tmp / "load_store.safetensors")
    xpeft_folder_s = median_time(
        lambda: model.load_adapter(tmp / "xpeft_load", adapter_name=f"x{next(counter)}"), repeats
    )
    names = iter(store.list())
    attach_s = median_time(lambda: attach_profile(model, store, next(names)), repeats)
    get_s = median_time(lambda: store.masks("s7"), 200)
    return {
        "lora_r8_load_adapter_ms": lora_s * 1e3,
        "xpeft_peft_load_adapter_ms": xpeft_folder_s * 1e3,
        "xpeft_store_attach_ms": attach_s * 1e3,
        "xpeft_store_get_decode_ms": get_s * 1e3,
        "speedup_store_get_vs_lora": lora_s / get_s,
        "speedup_store_attach_vs_lora": lora_s / attach_s,
        "speedup_peft_load_vs_lora": lora_s / xpeft_folder_s,
    }


def llama(quick: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096, hidden_size=256 if quick else 1024, intermediate_size=704 if quick else 2816,
        num_hidden_layers=2 if quick else 4, num_attention_heads=16, num_key_value_heads=4,
        max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def bench_mixed(quick: bool) -> dict:
    """Batch of 32 samples from 32 profiles: X-PEFT vs peft LoRA r=8 (q/v) with adapter_names vs the base model."""
    batch, seq, adapters = 32, (16 if quick else 64), 32
    repeats = 2 if quick else 9
    decode_repeats = 5 if quick else 25
    torch.manual_seed(1)
    input_ids = torch.randint(3, 4096, (batch, seq))
    next_ids = torch.randint(3, 4096, (batch, 1))
    mask = torch.ones(batch, seq + 1, dtype=torch.long)

    def prefill(model, **kwargs):
        with torch.no_grad():
            return model(input_ids=input_ids, use_cache=True, **kwargs)

    def decode_step(model, cache, **kwargs):
        with torch.no_grad():
            model(input_ids=next_ids, **{CACHE: cache}, attention_mask=mask, use_cache=True, **kwargs)
        cache.crop(-1)  # drop the new token: back to the prompt, so every timed step sees the same cache

    names = ["default"] + [f"a{i}" for i in range(1, adapters)]
    lora_config = {"r": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    lora = get_peft_model(llama(quick), LoraConfig(**lora_config))
    for name in names[1:]:
        lora.add_adapter(name, LoraConfig(**lora_config))
    xpeft_config = {"bank_size": 100, "mask_type": "soft", "init_weights": False}
    xp = get_peft_model(llama(quick), XPeftConfig(**xpeft_config))
    for name in names[1:]:
        xp.add_adapter(name, XPeftConfig(**xpeft_config))
    runs = {"base": (llama(quick), {}), "lora_mixed": (lora.eval(), {"adapter_names": names})}
    runs["xpeft_mixed"] = (xp.eval(), {"adapter_names": names})
    caches = {label: prefill(model, **kwargs)[CACHE] for label, (model, kwargs) in runs.items()}
    # Interleaved rounds (base, LoRA, X-PEFT, base, ...): a change of load on the shared CPU hits all three alike.
    times = {f"{label}_{kind}": [] for label in runs for kind in ("prefill", "decode")}
    for _ in range(repeats):
        for label, (model, kwargs) in runs.items():
            times[f"{label}_prefill"].append(median_time(lambda m=model, k=kwargs: prefill(m, **k), 1, warmup=0))
    for _ in range(decode_repeats):
        for label, (model, kwargs) in runs.items():
            step = lambda m=model, k=kwargs, c=caches[label]: decode_step(m, c, **k)  # noqa: E731
            times[f"{label}_decode"].append(median_time(step, 1, warmup=1))
    results = {}
    for label in runs:
        results[f"{label}_prefill_s"] = statistics.median(times[f"{label}_prefill"])
        results[f"{label}_decode_ms"] = statistics.median(times[f"{label}_decode"]) * 1e3
        # The best round is the least disturbed by other jobs on a shared CPU; reported next to the median.
        results[f"{label}_prefill_best_s"] = min(times[f"{label}_prefill"])
        results[f"{label}_decode_best_ms"] = min(times[f"{label}_decode"]) * 1e3
    results["xpeft_prefill_over_base_best"] = results["xpeft_mixed_prefill_best_s"] / results["base_prefill_best_s"]
    results["lora_prefill_over_base_best"] = results["lora_mixed_prefill_best_s"] / results["base_prefill_best_s"]
    results["xpeft_decode_throughput_over_lora_best"] = (
        results["lora_mixed_decode_best_ms"] / results["xpeft_mixed_decode_best_ms"]
    )
    results["xpeft_prefill_over_base"] = results["xpeft_mixed_prefill_s"] / results["base_prefill_s"]
    results["lora_prefill_over_base"] = results["lora_mixed_prefill_s"] / results["base_prefill_s"]
    results["xpeft_decode_throughput_over_lora"] = results["lora_mixed_decode_ms"] / results["xpeft_mixed_decode_ms"]
    results["xpeft_decode_over_base"] = results["xpeft_mixed_decode_ms"] / results["base_decode_ms"]
    results["setup"] = {
        "batch": batch, "seq": seq, "profiles": adapters, "hidden": 256 if quick else 1024,
        "layers": 2 if quick else 4, "xpeft_mask_type": "soft", "xpeft_bank_size": 100, "lora": "r=8 on q_proj, v_proj",
    }  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds-long smoke run")
    parser.add_argument("--only", nargs="*", default=["bytes", "store", "loading", "mixed"])
    args = parser.parse_args()
    torch.manual_seed(0)
    report = {"quick": args.quick, "threads": torch.get_num_threads(), "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        sections = {"bytes": bench_bytes, "store": bench_store, "loading": bench_loading}
        for name in args.only:
            start = time.perf_counter()
            report[name] = bench_mixed(args.quick) if name == "mixed" else sections[name](tmp, args.quick)
            print(f"== {name} ({time.perf_counter() - start:.1f} s)\n{json.dumps(report[name], indent=1)}", flush=True)
    report["load_average_after"] = os.getloadavg()
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
