"""Quantized base layers: which ones the tuners can call, and how merging reads and writes their weights.

ETHER, X-PEFT and PEDRO act on a layer's activations, so they call a quantized base layer as a black box: its own
forward dequantizes. Only three things need to know about quantization, and they live here:

- the dtype to cast activations to before the base call ([`input_dtype`]): a bitsandbytes weight is stored as int8 or
  packed uint8, which is not the dtype the layer computes in;
- merging ([`merge_weight`], [`write_merged_weight`]): dequantize, merge in float, requantize with the layer's own
  quantization settings, as peft does for bitsandbytes LoRA. The requantized weight rounds the merged one again, so a
  merged quantized model equals the unmerged one only within the quantization error (a warning says so);
- refusing what cannot be adapted ([`check_not_torch_ao_quantized`], [`check_conv_not_quantized`]).

Supported: bitsandbytes `Linear8bitLt` (int8 weights) and `Linear4bit` (nf4/fp4), torchao `Int8Tensor` weights without
activation quantization (`quantize_(model, Int8WeightOnlyConfig())`), and optimum-quanto `QLinear` with frozen integer
weights (`quantize(model, weights=qint8); freeze(model)`). The libraries are looked up in `sys.modules` only: a layer
of a library that was never imported cannot exist, and xpeft does not pay their import time.
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

ROUNDING_WARNING = (
    "Merging an adapter into quantized base weights dequantizes them, merges in float and quantizes the result again: "
    "the merged model differs from the unmerged one by up to one quantization step per weight, and unmerging does "
    "not give back the original quantized weights exactly. To merge without rounding, merge into a float (not "
    "quantized) copy of the base model."
)


def _bnb_kind(layer: nn.Module) -> str | None:
    """'8bit' or '4bit' for a bitsandbytes layer whose weight is quantized, else None."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(layer, bnb.nn.Linear4bit):
        return "4bit"
    # With has_fp16_weights=True, Linear8bitLt keeps a float weight (quantized per call): a plain weight for merging.
    if isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8:
        return "8bit"
    return None


def _is_torchao_weight(weight: torch.Tensor) -> bool:
    torchao_utils = sys.modules.get("torchao.utils")
    return torchao_utils is not None and isinstance(weight, torchao_utils.TorchAOBaseTensor)


def _is_quanto_weight(weight: torch.Tensor) -> bool:
    quanto = sys.modules.get("optimum.quanto")
    return quanto is not None and isinstance(weight, quanto.QTensor)


def is_quantized(layer: nn.Module) -> bool:
    """Whether `layer`'s weight is stored quantized (bitsandbytes, torchao or optimum-quanto), so that it cannot be
    read or written as a float tensor."""
    weight = getattr(layer, "weight", None)
    if weight is None:
        return False
    return _bnb_kind(layer) is not None or _is_torchao_weight(weight) or _is_quanto_weight(weight)


def input_dtype(layer: nn.Module, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype to give the activations that enter `layer`: its weight's dtype for a float weight (torchao and quanto
    weights report their float dtype), else the layer's compute dtype (bitsandbytes 4-bit) or, failing that, `x_dtype`
    unchanged (bitsandbytes 8-bit computes in the dtype of its input)."""
    weight_dtype = layer.weight.dtype
    if weight_dtype.is_floating_point:
        return weight_dtype
    return getattr(layer, "compute_dtype", None) or x_dtype


def check_not_torch_ao_quantized(layer: nn.Module, method: str) -> None:
    """Refuse a layer quantized by `torch.ao.quantization` (`quantize_dynamic`, eager static quantization), naming its
    full class: its short name is `Linear`, which reads like the supported `torch.nn.Linear`."""
    module = type(layer).__module__
    if not module.startswith(("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
        return
    cls = f"{module}.{type(layer).__qualname__}"
    raise TypeError(
        f"{method} cannot adapt a `{cls}`: a layer quantized by torch.ao.quantization (e.g. `quantize_dynamic`) keeps "
        "its weight packed for its own kernels, and is not a `torch.nn.Linear`. Add the adapter to the float model "
        "and quantize after `merge_and_unload()`, or quantize the base with bitsandbytes (`Linear8bitLt`, "
        "`Linear4bit`), torchao (`quantize_(model, Int8WeightOnlyConfig())`) or optimum-quanto (qint8 `QLinear`), "
        "which xpeft supports."
    )


def check_conv_not_quantized(layer: nn.Module, module_name: str) -> None:
    """Refuse a quantized convolution for ETHER, which transforms a convolution's filters (not its activations) at
    every forward: the layer would quantize the transformed filters again on each call, so the unmerged adapter
    would silently compute its merged, rounded form."""
    if is_quantized(layer):
        raise TypeError(
            f"ETHER cannot adapt the convolution {module_name!r}: its weight is quantized "
            f"(`{type(layer).__module__}.{type(layer).__qualname__}`), and ETHER transforms a convolution's filters "
            "at every forward, which such a layer would quantize again on each call. Leave the module out with "
            "`exclude_modules`, or quantize only the linear layers (e.g. optimum-quanto's `include=`)."
        )


def merge_weight(layer: nn.Module) -> torch.Tensor:
    """`layer`'s weight as a float tensor to merge into: the stored tensor itself for a float weight, a dequantized
    copy for a quantized one (see [`write_merged_weight`] for the way back)."""
    weight = layer.weight
    kind = _bnb_kind(layer)
    if kind == "4bit":
        functional = sys.modules["bitsandbytes"].functional
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # An inference forward on CPU repacks the weight for bitsandbytes' CPU kernel (bfloat16 scales, another
            # layout) that `dequantize_4bit` misreads; undo it first, as bitsandbytes does before moving the weight.
            weight.data, weight.quant_state = functional._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
        return functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "8bit":
        scale = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return sys.modules["bitsandbytes"].functional.int8_vectorwise_dequant(weight.data, scale.to(weight.device))
    if _is_torchao_weight(weight) or _is_quanto_weight(weight):
        _check_requantizable(layer)
        return weight.dequantize()
    return weight.data


def write_merged_weight(layer: nn.Module, new_weight: torch.Tensor) -> None:
    """Store the float `new_weight` (computed from [`merge_weight`]) as `layer`'s weight: in place for a float weight
    (it stays the same tensor, also under `torch.inference_mode`), requantized with the layer's own settings for a
    quantized one, with a warning about rounding."""
    if not is_quantized(layer):
        layer.weight.data.copy_(new_weight)
        return
    warnings.warn(ROUNDING_WARNING, stacklevel=3)
    weight = layer.weight
    kind = _bnb_kind(layer)
    if kind is not None:
        _write_bnb(layer, kind, new_weight)
    elif _is_torchao_weight(weight):
        _write_torchao(layer, new_weight)
    else:  # optimum-quanto: `freeze` quantizes a float weight with the layer's own qtype and optimizer
        layer.weight = nn.Parameter(new_weight.to(weight.dtype), requires_grad=False)
        layer.freeze()
        layer.weight.requires_grad_(False)  # `freeze` makes a new parameter, which would require grad


def _write_bnb(layer: nn.Module, kind: str, new_weight: torch.Tensor) -> None:
    bnb, weight = sys.modules["bitsandbytes"], layer.weight
    # bitsandbytes quantizes a parameter when it is moved to a device; it expects it to come from the CPU.
    if kind == "4bit":
        settings = {key: value for key, value in vars(weight).items() if not key.startswith("_")}
        settings.update(bnb_quantized=False, requires_grad=False)
        settings.pop("data", None)
        layer.weight = bnb.nn.Params4bit(new_weight.to("cpu"), **settings).to(weight.device)
        return
    layer.weight = bnb.nn.Int8Params(
        new_weight.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights
    ).to(weight.device)
    layer.init_8bit_state()  # the layer's matmul state still holds the old weight's scales


def _torchao_granularity(weight: torch.Tensor):
    """The torchao granularity that produced `weight`'s `block_size` (per tensor, per row or per group)."""
    from torchao.quantization import PerGroup, PerTensor

    block_size = list(weight.block_size)
    if block_size == list(weight.shape):
        return PerTensor()
    return PerGroup(block_size[-1])  # per row is one group of the whole row


def _write_torchao(layer: nn.Module, new_weight: torch.Tensor) -> None:
    weight = layer.weight
    requantized = type(weight).from_hp(
        new_weight.to(weight.dtype), granularity=_torchao_granularity(weight), reduce_range=weight.reduce_range
    )
    # A torchao tensor cannot be written into (its dispatch refuses `copy_`): the layer gets a new parameter.
    layer.weight = nn.Parameter(requantized, requires_grad=False)


def _check_requantizable(layer: nn.Module) -> None:
    """Refuse to merge into a torchao or quanto weight that [`write_merged_weight`] could not quantize again the same
    way, before anything is changed."""
    weight = layer.weight
    problem = None
    if _is_torchao_weight(weight):
        from torchao.quantization import Int8Tensor

        if type(weight) is not Int8Tensor:
            problem = f"a torchao `{type(weight).__name__}` weight"
        elif weight.act_quant_kwargs is not None or weight.act_pre_scale is not None:
            problem = "a torchao `Int8Tensor` weight with activation quantization"
        elif weight.zero_point is not None and bool(weight.zero_point.any()):
            problem = "an asymmetric torchao `Int8Tensor` weight"
    elif not hasattr(layer, "freeze") or not hasattr(layer, "weight_qtype"):
        problem = f"an optimum-quanto `{type(weight).__name__}` weight outside a quanto `QModuleMixin` layer"
    if problem is not None:
        raise ValueError(
            f"Cannot merge into {problem}: xpeft requantizes merged weights only for bitsandbytes 8-bit/4-bit, torchao "
            "int8 weight-only (`Int8WeightOnlyConfig`) and optimum-quanto layers. Keep the model unmerged (it runs as "
            "is), or merge into a float (not quantized) copy of the base model and quantize the merged model."
        )
