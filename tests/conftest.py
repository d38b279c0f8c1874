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
