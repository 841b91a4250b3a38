import pytest
import torch


def pytest_generate_tests(metafunc):
    # Contract suites (see contract.py) declare the models they run on as a class attribute.
    if "model_name" in metafunc.fixturenames and metafunc.cls is not None and hasattr(metafunc.cls, "models"):
        metafunc.parametrize("model_name", metafunc.cls.models)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
