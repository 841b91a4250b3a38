"""FSDP2 (`fully_shard`, gloo, 2 CPU processes): the recipe of examples/fsdp2_train.py for every method, and refusals.

One `torchrun --nproc_per_node 2 tests/test_fsdp2.py OUT` launch (this file is also the worker) runs the example's
`main` for every method, then the saves that must be refused, on both ranks, recording what each rank saw. The tests
reload the saved adapters in this process and compare them with a one-process run of the same steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import fsdp2_train  # noqa: E402
from fsdp2_train import METHODS, batch, peft_config, tiny_llama  # noqa: E402

STEPS, LR = 3, 1e-2
# Two ranks average their gradients in another order than one process summing the batch; after 3 AdamW steps the
# logits agree to 1e-7 here (0 for X-PEFT). 1e-5 absolute leaves room for other BLAS builds and stays far below
# what the training changes (asserted, > 10 * ATOL).
ATOL = 1e-5
LAUNCH_TIMEOUT = 150  # seconds (the launch takes 20-40 s here); a deadlocked save must fail the test, not hang CI


# -- the worker: runs under torchrun ------------------------------------------------------------------------------


def _attempt(action) -> dict:
    try:
        action()
    except Exception as error:  # noqa: BLE001  (recorded for the test to check type and words)
        return {"error": type(error).__name__, "message": str(error)}
    return {"error": None}


def _sharded_model(method: str):
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), peft_config(method))
    fsdp2_train.shard(model)
    return model


def worker(out: str) -> None:
    import torch.distributed as dist

    import xpeft  # noqa: F401

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    fsdp2_train.main(["--method", *METHODS, "--out", out, "--steps", str(STEPS), "--lr", str(LR)])
    seen = {}
    for method in ("ether", "x_peft_hard"):
        model = _sharded_model(method)
        # Rank 0 alone saves, as users do: refused, and no collective starts (x_peft_hard used to deadlock here).
        if rank == 0:
            seen[f"direct/{method}"] = _attempt(lambda m=model, x=method: m.save_pretrained(f"{out}/refused-{x}"))
            sharded = model.state_dict()  # DTensors, no collective
            seen[f"sharded/{method}"] = _attempt(
                lambda m=model, x=method, s=sharded: m.save_pretrained(f"{out}/refused-sharded-{x}", state_dict=s)
            )
        dist.barrier()
    # The accelerate pattern: every rank calls save_pretrained(is_main_process=...) with the gathered state dict, which
    # is empty off rank 0 (cpu_offload): rank 1 must neither fail nor start a collective.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = _sharded_model("x_peft_soft")
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen["all_ranks"] = _attempt(
        lambda: model.save_pretrained(f"{out}/all-ranks", state_dict=state, is_main_process=rank == 0)
    )
    dist.barrier()
    Path(out, f"seen.rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()


# -- the tests --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, str(out)]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=ROOT)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the FSDP2 launch did not finish in {LAUNCH_TIMEOUT} s (a deadlocked save?):\n{error.stderr}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    seconds = time.perf_counter() - start
    seen = [json.loads((out / f"seen.rank{rank}.json").read_text()) for rank in (0, 1)]
    return {"out": out, "seen": seen, "seconds": seconds, "stdout": result.stdout}


def _reference(method: str):
    """The same steps in one process, without FSDP, on the whole batch."""
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), peft_config(method))
    fsdp2_train.train(model, batch(), STEPS, LR)
    return model.eval()


def _logits(model) -> torch.Tensor:
    inputs = batch()
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_training_saved_on_rank_0_equals_one_process_run(launch, method, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    import xpeft  # noqa: F401

    reference = _reference(method)
    reference.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), launch["out"] / method).eval()
    expected = load_file(tmp_path / "adapter_model.safetensors")
    saved = load_file(launch["out"] / method / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        if tensor.dtype == torch.uint8:  # hard masks: the same selections, bit for bit
            assert torch.equal(saved[key], tensor), key
        else:
            torch.testing.assert_close(saved[key], tensor, atol=ATOL, rtol=0, msg=key)
    untrained = get_untrained_logits(method)
    reached = _logits(loaded)
    expected_logits = _logits(reference)
    print(
        f"{method}: max |FSDP2 - 1 process| {(reached - expected_logits).abs().max():.2e}, "
        f"trained - untrained {(reached - untrained).abs().max():.2e}"
    )
    torch.testing.assert_close(reached, expected_logits, atol=ATOL, rtol=0)
    assert (reached - untrained).abs().max() > 10 * ATOL, "training changed nothing: the comparison proves nothing"


def get_untrained_logits(method: str) -> torch.Tensor:
    from peft import get_peft_model

    return _logits(get_peft_model(tiny_llama(), peft_config(method)).eval())


@pytest.mark.parametrize("method", ["ether", "x_peft_hard"])
def test_direct_save_of_a_sharded_model_is_refused_with_the_recipe(launch, method):
    seen = launch["seen"][0][f"direct/{method}"]
    assert seen["error"] == "ValueError"
    assert "sharded with FSDP2" in seen["message"] and "get_model_state_dict" in seen["message"]
    assert "full_state_dict=True" in seen["message"] and "state_dict=state" in seen["message"]
    assert not (launch["out"] / f"refused-{method}").exists()


@pytest.mark.parametrize("method", ["ether", "x_peft_hard"])
def test_a_sharded_state_dict_is_refused_and_nothing_is_written(launch, method):
    seen = launch["seen"][0][f"sharded/{method}"]
    assert seen["error"] == "ValueError"
    assert "is a sharded DTensor" in seen["message"] and "get_model_state_dict" in seen["message"]
    assert not (launch["out"] / f"refused-sharded-{method}" / "adapter_model.safetensors").exists()


def test_every_rank_may_call_save_with_is_main_process(launch):
    from peft import PeftModel

    import xpeft  # noqa: F401

    assert [seen["all_ranks"]["error"] for seen in launch["seen"]] == [None, None]
    # Untrained soft masks: the folder must load, with the masks of a fresh profile.
    loaded = PeftModel.from_pretrained(tiny_llama(), launch["out"] / "all-ranks").eval()
    torch.testing.assert_close(_logits(loaded), get_untrained_logits("x_peft_soft"), atol=0, rtol=0)


def test_direct_save_of_an_fsdp1_model_is_refused(tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel

    # FSDP1 cannot be built on CPU ("FSDP needs a non-CPU accelerator device", torch 2.13): an FSDP1 wrapper that was
    # never initialised stands in for one, which is all the check looks at.
    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(wrapper)
    model = _plain("x_peft_soft")
    model.base_model.model.fsdp1_stand_in = wrapper
    with pytest.raises(
        ValueError, match=r"wrapped in FSDP1 .*directly\. Gather a full state dict on every rank first"
    ):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_launch_is_fast_enough_for_ci(launch):
    assert launch["seconds"] < LAUNCH_TIMEOUT
    print(f"FSDP2 launch: {launch['seconds']:.1f} s")


# -- refusals that need no process group --------------------------------------------------------------------------


def _plain(method: str):
    from peft import get_peft_model

    import xpeft  # noqa: F401

    return get_peft_model(tiny_llama(), peft_config(method))


@pytest.mark.parametrize("method", METHODS)
def test_an_empty_adapter_tensor_is_refused_at_save_time(method, tmp_path):
    model = _plain(method)
    state = model.state_dict()
    key = next(name for name, p in model.named_parameters() if p.requires_grad)
    state[key] = torch.empty(0)
    with pytest.raises(ValueError, match=r"is empty \(shape \[0\]\).*Gather a full state dict on every rank first"):
        model.save_pretrained(tmp_path / "out", state_dict=state)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_a_state_dict_without_the_adapter_is_refused(tmp_path):
    model = _plain("ether")
    state = {key: value for key, value in model.state_dict().items() if "ether_" not in key}
    with pytest.raises(ValueError, match=r"lacks 4 adapter tensor\(s\).*pass the whole model's state dict"):
        model.save_pretrained(tmp_path / "out", state_dict=state)


def test_a_partial_x_peft_mask_is_refused_before_packing(tmp_path):
    model = _plain("x_peft_hard")
    state = model.state_dict()
    key = next(name for name in state if "xpeft_mask_A" in name)
    state[key] = state[key][:3]  # what a rank holding part of a flattened FSDP1 parameter sees
    with pytest.raises(ValueError, match=r"has shape \[3\], not \[8\] \(bank_size\).*Gather a full state dict"):
        model.save_pretrained(tmp_path / "out", state_dict=state)


def test_a_full_state_dict_saves_like_a_plain_save(tmp_path):
    from safetensors.torch import load_file

    model = _plain("pedro")
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "given", state_dict=model.state_dict())
    plain, given = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("plain", "given"))
    assert plain.keys() == given.keys() and all(torch.equal(plain[k], given[k]) for k in plain)


if __name__ == "__main__":
    worker(sys.argv[1])
