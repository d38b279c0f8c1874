"""Model trees used across tests: every shape of module call the tracker must handle."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Recursive(nn.Module):
    """A re-entrant module: it calls itself ``depth`` times."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, depth: int = 2) -> torch.Tensor:
        x = self.lin(x).relu()
        return self(x, depth - 1) if depth > 0 else x


class Tree(nn.Module):
    """Embedding root (integer input), ModuleDict, ModuleList, a shared module called
    twice, a re-entrant module and an activation-checkpointed block."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.heads = nn.ModuleDict({"main": nn.Linear(8, 8)})
        self.shared = nn.Linear(8, 8)
        self.rec = Recursive()
        self.ckpt = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x).relu()
        x = self.shared(x)
        x = self.shared(x)  # the same module, twice in one step
        x = self.rec(x)
        x = checkpoint(self.ckpt, x, use_reentrant=False)
        return self.heads["main"](x)


# Forward calls per step of Tree, by FQN.
TREE_FORWARD_CALLS = {
    "Tree": 1,
    "Tree.embed": 1,
    "Tree.layers.0": 1,
    "Tree.layers.1": 1,
    "Tree.shared": 2,
    "Tree.rec": 3,
    "Tree.rec.lin": 3,
    "Tree.ckpt": 1,
    "Tree.ckpt.0": 1,
    "Tree.ckpt.1": 1,
    "Tree.ckpt.2": 1,
    "Tree.heads.main": 1,
}
RECOMPUTED = {"Tree.ckpt", "Tree.ckpt.0", "Tree.ckpt.1", "Tree.ckpt.2"}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    tokens = torch.randint(0, 16, (4, 5))
    model(tokens).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


class Pair(nn.Module):
    """Several inputs and a tuple of outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x) + y, self.b(y)


class Shapes(nn.Module):
    """Leaf input, several inputs, tuple outputs, a parameter as output, a no-grad call,
    a reentrant checkpoint and a dict input."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.pair = Pair()
        self.scale = nn.Module()
        self.scale.weight = nn.Parameter(torch.ones(4))
        self.frozen = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.identity = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)  # x is a leaf that requires grad
        p, q = self.pair(h, x)
        with torch.no_grad():
            self.frozen(h)
        h = checkpoint(self.block, p * q, use_reentrant=True)
        w = self.identity(self.scale.weight)  # a leaf returned as output
        return (h * w).sum() + self.identity({"k": q})["k"].sum()


def shapes_model():
    return Shapes(), lambda m: m(torch.randn(3, 4, requires_grad=True)).backward()
