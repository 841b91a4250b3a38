"""The example Trainer scripts (examples/train_*.py) on tiny models: one process in-process, and a 2-process DDP run.

The DDP run is `accelerate launch --multi_gpu --num_processes 2` (torch.distributed over gloo on this CPU machine;
accelerate's own `--cpu` flag starts a single process): every rank writes the sha256 of its trainable tensors, which
must agree; the loss must fall; the saved adapter must load with `PeftModel.from_pretrained` and hold those tensors.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import xpeft

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))
common = importlib.import_module("common")

# script, xpeft config class it needs, extra args, classification?
SCRIPTS = {
    "ether": ("train_ether", "EtherConfig", ["--variant", "ether", "--lr", "3e-2"], True),
    "ether_plus": ("train_ether", "EtherConfig", ["--variant", "ether_plus", "--lr", "3e-2"], True),
    "x_peft_soft": ("train_x_peft", "XPeftConfig", ["--mask-type", "soft", "--lr", "1e-1"], True),
    "x_peft_hard": ("train_x_peft", "XPeftConfig", ["--mask-type", "hard", "--hard-k", "2", "--lr", "1e-1"], True),
    "pedro": ("train_pedro", "PedroConfig", ["--lr", "3e-2"], False),
    "lora": ("train_ether", None, ["--baseline", "lora", "--lr", "3e-2"], True),
    "ia3_causal": ("train_pedro", None, ["--baseline", "ia3", "--lr", "3e-2"], False),
}


def _needs(config_name):
    if config_name is not None and not hasattr(xpeft, config_name):
        pytest.skip(f"xpeft.{config_name} is not on this branch yet")


def _base_model(classification, args):
    return common.classification_setup(args)[0] if classification else common.causal_setup(args)[0]


@pytest.mark.parametrize("method", list(SCRIPTS))
def test_example_trains_saves_and_reloads(method, tmp_path, monkeypatch):
    script, config_name, extra, classification = SCRIPTS[method]
    _needs(config_name)
    monkeypatch.setenv("XPEFT_QUIET", "1")
    out = tmp_path / method
    argv = ["--tiny", "--max-steps", "60", "--batch-size", "16", "--output-dir", str(out), *extra]
    record, trained = importlib.import_module(script).main(argv)
    losses = record["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert json.loads((out / "train_record.json").read_text())["adapter_sha256"] == record["adapter_sha256"]
    assert record["output_dir"] == str(out) and set(record["held_out_before"]) == set(record["held_out_after"])
    # a fresh base model (same seed) + the saved adapter reproduces the trained model exactly
    args = importlib.import_module(script).__dict__["base_parser"]("", 0.0, 0).parse_args(["--tiny"])
    loaded = PeftModel.from_pretrained(_base_model(classification, args), out).eval()
    trained.eval()
    batch = common.tiny_classification(4, seed=5) if classification else common.tiny_instructions(4, seed=5)
    inputs = {k: torch.stack([row[k] for row in batch]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trained(**inputs).logits, rtol=0, atol=0)


# one DDP run per xpeft script (about 30 s each here); ETHER stays in the quick set, the other two are marked slow
DDP_METHODS = [
    "ether",
    pytest.param("x_peft_soft", marks=pytest.mark.slow),
    pytest.param("pedro", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("method", DDP_METHODS)
def test_two_process_ddp_keeps_ranks_identical(method, tmp_path):
    script, config_name, extra, classification = SCRIPTS[method]
    _needs(config_name)
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    out = tmp_path / "ddp"
    cmd = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(EXAMPLES / f"{script}.py"), "--tiny", "--max-steps", "60", "--batch-size", "8", "--output-dir", str(out),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "XPEFT_QUIET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((out / f"train_record.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["adapter_sha256"] == records[1]["adapter_sha256"]
    losses = records[0]["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    # the logged loss is the loss, not the loss times the number of processes (transformers' default doubles it):
    # a 1-process run over the same 16 examples a step (2 x 8 above) logs the same level (dropout differs per rank)
    single, _ = importlib.import_module(script).main(
        ["--tiny", "--max-steps", "60", "--batch-size", "16", "--output-dir", str(tmp_path / "one"), *extra]
    )
    ratio = (sum(losses) / len(losses)) / (sum(single["losses"]) / len(single["losses"]))
    assert 0.9 < ratio < 1.1, (losses, single["losses"])
    # the saved adapter holds exactly the tensors both ranks trained
    args = common.base_parser("", 0.0, 0).parse_args(["--tiny"])
    loaded = PeftModel.from_pretrained(_base_model(classification, args), out, is_trainable=True)
    assert common.adapter_checksum(loaded) == records[0]["adapter_sha256"]


def test_runs_without_output_dir_get_their_own_folder_and_say_where(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XPEFT_QUIET", "1")
    train_ether = importlib.import_module("train_ether")
    argv = ["--tiny", "--max-steps", "2", "--baseline", "lora"]
    first, _ = train_ether.main(argv)
    second, _ = train_ether.main(argv)
    assert first["output_dir"] != second["output_dir"]
    printed = capsys.readouterr().out
    for record in (first, second):
        assert (tmp_path / record["output_dir"] / "adapter_model.safetensors").is_file()
        assert f"adapter saved to {record['output_dir']}" in printed
    assert "before training ->" in printed


def test_every_flag_has_help_and_shows_its_default():
    for script in ("train_ether", "train_x_peft", "train_pedro"):
        parser = _parser_of(script)
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{script} {action.option_strings} has no help text"
        assert "(default:" in parser.format_help()


def _parser_of(script):
    """The script's argparse parser, caught as main() builds it (main parses `--help`, which exits)."""
    import argparse

    seen = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        seen.append(self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        importlib.import_module(script).main(["--help"])
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return seen[0]
