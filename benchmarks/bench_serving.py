"""Serving benchmark: 10,000 X-PEFT profiles from one `ProfileStore` in mixed batches on BERT-base geometry, against
peft LoRA r=8 loaded per profile with `load_adapter`, each also against serving a single profile.

    PYTHONPATH=src python benchmarks/bench_serving.py            # full run, writes benchmarks/results/serving.json
    PYTHONPATH=src python benchmarks/bench_serving.py --quick    # seconds-long smoke run (tiny model, few profiles)

The request stream: every profile of the store exactly once, in a seeded order, in mixed batches of `--batch`
samples of `--seq` random tokens. A profile not resident is attached (X-PEFT: `xpeft.attach_profile` from the store;
LoRA: `load_adapter` from a saved folder); beyond `--resident` profiles the least recently used one is deleted
(`delete_adapter`). Each sample names its profile in peft's `adapter_names`. Each method runs in a child process of
its own, which reports its peak RSS (VmHWM), so that the methods do not contaminate each other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertModel

import xpeft
from xpeft import ProfileStore, XPeftConfig, attach_profile
from xpeft.x_peft import layer as xpeft_layer
from xpeft.x_peft import pack_masks

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "serving.json"
SEED = 0
METHODS = ("xpeft", "xpeft_one", "lora", "lora_one")
XPEFT = {"bank_size": 100, "mask_type": "hard", "hard_k": 1}  # default targets: each block's output.dense
LORA = {"r": 8}  # peft's default targets for BERT: query, value
RSS_TARGET = 1.5  # X-PEFT peak RSS serving all profiles, at most this many times that of serving one


def geometry(quick: bool) -> BertConfig:
    """BERT-base (`BertConfig()` defaults: 12 layers, d=768); --quick: 2 layers of d=64."""
    if quick:
        return BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=256, num_attention_heads=4)
    return BertConfig()


def base_model(quick: bool) -> BertModel:
    torch.manual_seed(SEED)
    return BertModel(geometry(quick)).eval()


def profile_names(count: int) -> list[str]:
    return [f"user-{i:05d}" for i in range(count)]


def request_stream(profiles: int, batch: int, seq: int, vocab: int) -> list[tuple[list[str], torch.Tensor]]:
    """Every profile once, in a seeded order, as `(adapter_names, input_ids)` batches (the last may be shorter)."""
    names = profile_names(profiles)
    random.Random(SEED).shuffle(names)
    generator = torch.Generator().manual_seed(SEED)
    return [
        (names[i : i + batch], torch.randint(3, vocab, (len(names[i : i + batch]), seq), generator=generator))
        for i in range(0, len(names), batch)
    ]


def memory_mb(field: str) -> float:
    """`VmHWM` (peak) or `VmRSS` (now) of this process, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


# -- setup, in the parent -------------------------------------------------------------------------------------------


def xpeft_config(quick: bool) -> XPeftConfig:
    """The profiles' config, with the fingerprint of the bank on this geometry (it covers every adapted layer)."""
    return get_peft_model(base_model(quick), XPeftConfig(**XPEFT)).peft_config["default"]


def build_store(path: Path, profiles: int, layers: int, quick: bool) -> None:
    """A store of `profiles` seeded random hard-mask profiles (one bit-packed record each) for `layers` layers."""
    config = xpeft_config(quick)
    store = ProfileStore.create(path, config, layers=layers)
    generator = torch.Generator().manual_seed(SEED)
    logits = torch.randn(profiles, layers, 2, config.bank_size, generator=generator)
    rows = pack_masks(logits, config.mask_type, config.hard_k).view(profiles, -1)
    store.add(dict(zip(profile_names(profiles), rows, strict=True)), bank_fingerprint=config.bank_fingerprint)


def save_lora(path: Path, quick: bool) -> None:
    """One LoRA r=8 folder (non-zero B, so that it changes the output), loaded under every profile's name."""
    torch.manual_seed(SEED + 1)
    model = get_peft_model(base_model(quick), LoraConfig(**LORA, init_lora_weights=False))
    model.save_pretrained(path)


# -- serving, in a child process per method ------------------------------------------------------------------------


def serve(model, stream, resident: int, attach, requests: int | None, mark: int, label: str) -> dict:
    """Run the stream through `model`, attaching missing profiles and deleting the least recently used ones.

    Stops after `requests` requests (None: the whole stream); also reports the rate over the first `mark` requests.
    """
    resident_names: OrderedDict[str, None] = OrderedDict()
    attaches = deletes = served = 0
    at_mark = None
    adapter_s = forward_s = 0.0
    start = time.perf_counter()
    with torch.no_grad():
        for names, input_ids in stream:
            if requests is not None and served >= requests:
                break
            t0 = time.perf_counter()
            for name in names:
                if name not in resident_names:
                    attach(name)
                    attaches += 1
                resident_names[name] = None
                resident_names.move_to_end(name)
            while len(resident_names) > resident:  # the batch's own profiles are the most recent: never evicted
                model.delete_adapter(resident_names.popitem(last=False)[0])
                deletes += 1
            t1 = time.perf_counter()
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), adapter_names=names)
            forward_s += time.perf_counter() - t1
            adapter_s += t1 - t0
            served += len(names)
            if at_mark is None and served >= mark:
                at_mark = {"requests": served, "seconds": time.perf_counter() - start}
            if served % 1000 < len(names):
                rate = served / (time.perf_counter() - start)
                print(f"   {label}: {served} requests, {rate:.2f}/s", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    return {
        "requests": served,
        "distinct_profiles": attaches,
        "attaches": attaches,
        "deletes": deletes,
        "resident_at_end": len(resident_names),
        "seconds": seconds,
        "requests_per_s": served / seconds,
        "forward_seconds": forward_s,
        "attach_and_delete_seconds": adapter_s,
        "attach_and_delete_ms_per_profile": adapter_s / max(attaches, 1) * 1e3,
        "prefix": at_mark and {**at_mark, "requests_per_s": at_mark["requests"] / at_mark["seconds"]},
    }


def run_child(method: str, setup: dict) -> dict:
    quick, tmp = setup["quick"], Path(setup["tmp"])
    torch.set_num_threads(setup["threads"])
    geo = geometry(quick)
    stream = request_stream(setup["profiles"], setup["batch"], setup["seq"], geo.vocab_size)
    if method.endswith("_one"):  # the same batches, every sample for one profile
        stream = [([stream[0][0][0]] * len(names), ids) for names, ids in stream]
    requests = setup["lora_requests"] if method == "lora" else setup["single_requests"] if "_one" in method else None
    if method.startswith("xpeft"):
        # The template adapter only gives `attach_profile` its config; it is never requested nor deleted.
        model = get_peft_model(base_model(quick), XPeftConfig(**XPEFT)).eval()
        store = ProfileStore(tmp / "store.safetensors")

        def attach(name):
            attach_profile(model, store, name)
    else:
        model = PeftModel.from_pretrained(base_model(quick), tmp / "lora").eval()

        def attach(name):
            model.load_adapter(tmp / "lora", adapter_name=name)

    with torch.no_grad(), model.disable_adapter():  # one-time costs (kernel selection, allocations) before timing
        model(input_ids=stream[0][1], attention_mask=torch.ones_like(stream[0][1]))
    rss_setup = memory_mb("VmRSS")
    result = serve(model, stream, setup["resident"], attach, requests, setup["lora_requests"], method)
    result["rss_after_setup_mb"] = rss_setup
    result["peak_rss_mb"] = memory_mb("VmHWM")
    result["final_rss_mb"] = memory_mb("VmRSS")
    if method.startswith("xpeft"):
        layers = [m for m in model.modules() if isinstance(m, xpeft_layer.XPeftLayer)]
        result["composed_cache_entries_per_layer_at_end"] = max(len(m._composed_cache) for m in layers)
    return result


def spawn(method: str, setup: dict) -> dict:
    out = Path(setup["tmp"]) / f"{method}.json"
    cmd = [sys.executable, __file__, "--child", method, "--setup", json.dumps(setup), "--child-out", str(out)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
    }
    start, load_before = time.perf_counter(), os.getloadavg()
    proc = subprocess.run(cmd, env=env)  # its progress and errors go to this process's stderr
    if proc.returncode != 0:
        raise RuntimeError(f"child {method} failed with exit code {proc.returncode}; its error is printed above")
    result = json.loads(out.read_text())
    result["process_seconds"] = time.perf_counter() - start
    result["load_average_before"], result["load_average_after"] = load_before, os.getloadavg()
    return result


# -- report ---------------------------------------------------------------------------------------------------------


def git_revision() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads_default": torch.get_num_threads(),
        "memory_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "xpeft": xpeft.__version__,
    }


def ratios(results: dict) -> dict:
    x, x1, lora, lora1 = (results[m] for m in METHODS)
    out = {
        "xpeft_peak_rss_profiles_over_one": x["peak_rss_mb"] / x1["peak_rss_mb"],
        "lora_peak_rss_profiles_over_one": lora["peak_rss_mb"] / lora1["peak_rss_mb"],
        "xpeft_over_lora_peak_rss_profiles": x["peak_rss_mb"] / lora["peak_rss_mb"],
        "xpeft_over_lora_peak_rss_one": x1["peak_rss_mb"] / lora1["peak_rss_mb"],
        "xpeft_over_lora_requests_per_s_one": x1["requests_per_s"] / lora1["requests_per_s"],
        "xpeft_requests_per_s_profiles_over_one": x["requests_per_s"] / x1["requests_per_s"],
        "lora_requests_per_s_profiles_over_one": lora["requests_per_s"] / lora1["requests_per_s"],
    }
    # LoRA serves a prefix of the stream (`lora_requests`); X-PEFT's rate over the same prefix is the fair comparison.
    out["xpeft_over_lora_requests_per_s_same_prefix"] = x["prefix"]["requests_per_s"] / lora["requests_per_s"]
    out["xpeft_all_profiles_over_lora_prefix_requests_per_s"] = x["requests_per_s"] / lora["requests_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", type=int, default=None, help="X-PEFT profiles in the store, each served once "
                        "(default 10000; 96 with --quick)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=8, help="samples per mixed batch (default 8)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample (default 32; 8 with --quick)")
    parser.add_argument("--resident", type=int, default=None, help="profiles kept attached before the least recently "
                        "used is deleted, for both methods (default 64; 16 with --quick)")  # fmt: skip
    parser.add_argument("--lora-profiles", type=int, default=None, help="LoRA serves only this prefix of the stream "
                        "(one load_adapter per profile: 0.25-0.3 s on BERT-base with 64 resident, more with more; default 800; 48 with "
                        "--quick)")  # fmt: skip
    parser.add_argument("--single-requests", type=int, default=None, help="requests of the one-profile runs, a prefix "
                        "of the same stream (default 2000; 48 with --quick)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each child (default 1: on "
                        "a shared machine, 2 OpenMP threads on 2 busy cores ran a BERT-base forward 5x slower than 1)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny BERT (2 layers, d=64) and few profiles: seconds")
    parser.add_argument("--out", type=Path, default=None, help=f"results JSON (default {RESULTS}; not written "
                        "with --quick unless given)")  # fmt: skip
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.child_out.write_text(json.dumps(run_child(args.child, json.loads(args.setup))))
        return
    quick = args.quick

    def pick(value, full, small):
        return value if value is not None else small if quick else full

    setup = {
        "quick": quick,
        "profiles": pick(args.profiles, 10_000, 96),
        "batch": args.batch,
        "threads": args.threads,
        "seq": pick(args.seq, 32, 8),
        "resident": pick(args.resident, 64, 16),
        "lora_requests": pick(args.lora_profiles, 800, 48),
        "single_requests": pick(args.single_requests, 2_000, 48),
    }
    if setup["resident"] < setup["batch"]:
        parser.error(f"--resident ({setup['resident']}) must be at least --batch ({setup['batch']}): a batch's "
                     "profiles must all be attached at once")  # fmt: skip
    for key in ("lora_requests", "single_requests"):
        setup[key] = min(setup[key], setup["profiles"])
    geo = geometry(quick)
    report = {
        "benchmark": "serving",
        "git": git_revision(),
        "machine": machine(),
        "load_average_before": os.getloadavg(),
        "setup": {
            **setup,
            "model": f"BertModel, random init (seed {SEED}), {geo.num_hidden_layers} layers, d={geo.hidden_size}",
            "stream": "every profile once in a seeded order, mixed batches, random token ids, no padding",
            "xpeft": {
                **XPEFT,
                "targets": "X-PEFT default (each block's output.dense)",
                "composed_cache_size": xpeft_layer.COMPOSED_CACHE_SIZE,
            },  # fmt: skip
            "lora": {**LORA, "targets": "peft default (query, value)", "init_lora_weights": False},
            "peak_rss": "VmHWM of a child process per method",
        },
    }
    with tempfile.TemporaryDirectory() as tmp_dir:
        setup["tmp"] = tmp_dir
        start = time.perf_counter()
        build_store(Path(tmp_dir) / "store.safetensors", setup["profiles"], geo.num_hidden_layers, quick)
        save_lora(Path(tmp_dir) / "lora", quick)
        report["setup_seconds"] = time.perf_counter() - start
        results = {}
        for method in METHODS:
            results[method] = spawn(method, setup)
            print(f"== {method}: {json.dumps(results[method])}", flush=True)
    del setup["tmp"]
    report["results"] = results
    lora_ms = results["lora"]["attach_and_delete_ms_per_profile"]
    report["notes"] = [
        f"LoRA serves only the first {setup['lora_requests']} requests of the stream (as many profiles, one "
        f"load_adapter each), not all {setup['profiles']}: a load (with its share of deletes) took {lora_ms:.0f} ms, "
        "so all profiles would not fit the run's time budget. xpeft_over_lora_requests_per_s_same_prefix compares "
        "X-PEFT over the same prefix of the same stream.",
        f"The one-profile runs serve the first {setup['single_requests']} requests of the same stream, every sample "
        "naming one profile (through adapter_names, as in the mixed runs).",
        "Other jobs may share the machine: see each method's load_average_before/after.",
    ]
    report["ratios"] = ratios(results)
    rss_ratio = report["ratios"]["xpeft_peak_rss_profiles_over_one"]
    report["targets"] = {
        f"xpeft peak RSS serving {setup['profiles']} profiles within {RSS_TARGET}x of serving one": {
            "ratio": rss_ratio,
            "limit": RSS_TARGET,
            "met": rss_ratio <= RSS_TARGET,
        }
    }
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report["ratios"], indent=1))
    print(json.dumps(report["targets"], indent=1))
    out = args.out or (None if quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
