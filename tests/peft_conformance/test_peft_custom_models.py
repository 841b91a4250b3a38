"""peft's generic custom-model tests (`TestPeftCustomModel` and `TestMultipleActiveAdapters` in peft's
`tests/test_custom_models.py`), run on xpeft.

Each test of peft's classes that is parametrized over peft's `TEST_CASES` (or `MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`) is
re-parametrized over xpeft's rows (same names in `xpeft_cases`); the test bodies are peft's own, unchanged. Tests written for one peft method (LoRA's
`add_weighted_adapter`, DoRA, trainable tokens, ...) are not collected. The failures the math forces are listed,
with their reasons, in `xpeft_cases.EXPECTED_FAILURES` and marked `xfail(strict=True)` by `conftest.py`.
"""

from __future__ import annotations

import types

import pytest
import torch
from _upstream import SdistMissing, load_custom_model_tests
from transformers import LlamaConfig, LlamaForCausalLM
from xpeft_cases import EXPECTED_FAILURES, MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, TEST_CASES

try:
    upstream = load_custom_model_tests()
except SdistMissing as error:
    pytest.skip(str(error), allow_module_level=True)

pytestmark = pytest.mark.peft_conformance
GENERIC_ARGNAMES = "test_name, model_id, config_cls, config_kwargs"
MULTI_ADAPTER_ARGNAMES = "test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2"


class TinyLlamaLogits(LlamaForCausalLM):
    """A two-block Llama shaped like peft's custom models: its forward takes their input `X` (here token ids 0..89,
    one sequence per row) and returns log-probabilities `[batch, vocab]` of the next token, which the tests compare
    and train with `nll_loss`."""

    def forward(self, X=None, **kwargs):
        logits = super().forward(input_ids=X, **kwargs).logits
        return torch.log_softmax(logits[:, -1].float(), dim=-1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:
        # The tests set `model.dtype` so that their MLPs cast the float input; token ids need no cast.
        pass


class MockTransformerWrapper(upstream.MockTransformerWrapper):
    """peft's model factory, plus `TinyLlama`."""

    @classmethod
    def from_pretrained(cls, model_id, dtype=None):
        if model_id != "TinyLlama":
            return super().from_pretrained(model_id, dtype=dtype)
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=96,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16,
            pad_token_id=95,
            initializer_range=0.2,
        )
        config.name_or_path = model_id  # as `from_pretrained(model_id)` records it; the tests compare it
        return TinyLlamaLogits(config).to(dtype or torch.float32).eval()


def _reparametrized(cls: type, argnames: str, rows: list[tuple]) -> dict[str, types.FunctionType]:
    """The tests of `cls` parametrized over `argnames` (peft's rows), as copies parametrized over xpeft's `rows`; any
    other parametrization of the same test (e.g. over dtypes) is kept."""
    tests = {}
    for name, function in vars(cls).items():
        marks = getattr(function, "pytestmark", [])
        generic = [m for m in marks if m.name == "parametrize" and m.args[0] == argnames]
        if not name.startswith("test_") or not generic:
            continue
        copy = types.FunctionType(
            function.__code__, function.__globals__, name, function.__defaults__, function.__closure__
        )
        copy.__dict__.update(function.__dict__)
        copy.__qualname__ = function.__qualname__
        others = [m for m in marks if m not in generic]
        copy.pytestmark = [*others, pytest.mark.parametrize(argnames, rows, ids=[row[0] for row in rows]).mark]
        tests[name] = copy
    return tests


def _not_collected(cls: type, kept: dict) -> dict[str, None]:
    """Method-specific tests of peft's class (LoRA, DoRA, trainable tokens, ...), hidden from collection."""
    return {name: None for name in vars(cls) if name.startswith("test_") and name not in kept}


GENERIC_TESTS = _reparametrized(upstream.TestPeftCustomModel, GENERIC_ARGNAMES, TEST_CASES)
MULTI_ADAPTER_TESTS = _reparametrized(
    upstream.TestMultipleActiveAdapters, MULTI_ADAPTER_ARGNAMES, MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES
)


def test_expected_failures_name_existing_tests_and_rows():
    """An entry naming a test or row that does not exist (renamed upstream, or a typo) would silently expect nothing."""
    rows = {name for name, *_ in TEST_CASES + MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES}
    for expected in EXPECTED_FAILURES:
        assert expected.cases and set(expected.cases) <= rows, expected
        assert set(expected.tests) <= set(GENERIC_TESTS) | set(MULTI_ADAPTER_TESTS), expected.tests


class TestXpeftCustomModel(upstream.TestPeftCustomModel):
    transformers_class = MockTransformerWrapper

    locals().update(GENERIC_TESTS | _not_collected(upstream.TestPeftCustomModel, GENERIC_TESTS))


class TestXpeftMultipleActiveAdapters(upstream.TestMultipleActiveAdapters):
    def resolve_model_cls(self, tuner_method):
        if tuner_method == "pedro":
            return MockTransformerWrapper.from_pretrained("TinyLlama")
        return super().resolve_model_cls(tuner_method)

    locals().update(MULTI_ADAPTER_TESTS | _not_collected(upstream.TestMultipleActiveAdapters, MULTI_ADAPTER_TESTS))
