import pytest
import torch
from torch.nn.modules import module as nn_module

_GLOBAL_HOOK_DICTS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_forward_hooks_always_called",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


def _global_hooks() -> dict[str, int]:
    return {name: len(getattr(nn_module, name)) for name in _GLOBAL_HOOK_DICTS}


@pytest.fixture(autouse=True)
def no_leftover_global_hooks():
    """Fail any test that leaves global nn.Module hooks behind."""
    before = _global_hooks()
    yield
    after = _global_hooks()
    if after != before:
        for name in _GLOBAL_HOOK_DICTS:
            getattr(nn_module, name).clear()
        pytest.fail(f"test left global module hooks behind: before={before} after={after}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_models_record_the_host_only(request, monkeypatch):
    """On a machine with a GPU, once any test has initialised CUDA, device="auto" marks
    later tests' CPU models on the GPU too (a documented limit: README, Limits), which the
    CPU tests' expectations do not include. There, tests not marked ``cuda`` get
    ``device="cpu"`` as the Timeline's default; a test that passes a device keeps it.
    (No-op without CUDA, so on CI.)"""
    if torch.cuda.is_available() and request.node.get_closest_marker("cuda") is None:
        from modtimeline import Timeline

        monkeypatch.setitem(Timeline.__init__.__kwdefaults__, "device", "cpu")
    yield
