"""A corpus of models nobody here wrote (``transformers``, small configs, random init,
never a download), plus a ViT of the timm kind and a routed MoE written the way those
libraries write them. Each entry builds a model and one training step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Step = Callable[[], torch.Tensor]  # one forward returning a loss; the caller runs backward


def _ids(vocab: int, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


def llama() -> tuple[nn.Module, Step]:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    ids = _ids(96)
    return model, lambda: model(input_ids=ids, labels=ids).loss


def gpt2(dropout: float | None = None, checkpointing: bool = False) -> tuple[nn.Module, Step]:
    from transformers import GPT2Config, GPT2LMHeadModel

    extra: dict[str, Any] = {}
    if dropout is not None:
        extra = dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64, **extra))
    if checkpointing:
        # (transformers 5 renamed it; 4.x has only the old name)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    ids = _ids(96)
    return model, lambda: model(input_ids=ids, labels=ids).loss


def bert() -> tuple[nn.Module, Step]:
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=64))
    model.train()
    ids = _ids(96)
    return model, lambda: model(input_ids=ids, labels=ids).loss


def t5() -> tuple[nn.Module, Step]:
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                                pad_token_id=0))
    model.train()
    ids, labels = _ids(96), _ids(96, length=8)
    return model, lambda: model(input_ids=ids, labels=labels).loss


def mixtral() -> tuple[nn.Module, Step]:
    from transformers import MixtralConfig, MixtralForCausalLM

    model = MixtralForCausalLM(MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2, max_position_embeddings=64))
    ids = _ids(96)
    return model, lambda: model(input_ids=ids, labels=ids).loss


# ------------------------------------------------------------- timm-style ViT


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: returns its input when p = 0 or in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.attn_drop((q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Dropout(0.0), nn.Linear(dim * 2, dim))
        self.ls2 = LayerScale(dim)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ViT(nn.Module):
    """A small ViT in timm's shape: Identity norms, DropPath, LayerScale, an Identity
    fc_norm, and one block called twice (weight sharing)."""

    def __init__(self, dim: int = 32, depth: int = 4, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(*[Block(dim, heads, drop_path=0.0) for _ in range(depth)])
        self.shared = Block(dim, heads, drop_path=0.0)
        self.norm = nn.LayerNorm(dim)
        self.fc_norm = nn.Identity()
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = self.pos_drop(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1))
        x = self.shared(self.shared(self.blocks(x)))
        return self.head(self.fc_norm(self.norm(x)[:, 0]))


def vit() -> tuple[nn.Module, Step]:
    model = ViT()
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    return model, lambda: nn.functional.cross_entropy(model(images), labels)


# --------------------------------------------------------------------- MoE


class Expert(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, dim * 2)
        self.down = nn.Linear(dim * 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class RoutedMoE(nn.Module):
    """Top-1 routing over per-expert modules, called only on their tokens (the last
    expert is never routed to: it does not run in the step at all)."""

    def __init__(self, dim: int = 16, experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(dim, experts - 1)
        self.experts = nn.ModuleList(Expert(dim) for _ in range(experts))
        self.out = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.router(x).softmax(-1)
        choice = weights.argmax(-1)
        y = torch.zeros_like(x)
        for number, expert in enumerate(self.experts):
            rows = (choice == number).nonzero().flatten()
            if len(rows):
                y = y.index_add(0, rows, expert(x[rows]) * weights[rows, number, None])
        return self.out(y).sum()


def moe() -> tuple[nn.Module, Step]:
    model = RoutedMoE()
    x = torch.randn(32, 16)
    return model, lambda: model(x)


# ------------------------------------------------------------- minimal case


class PassBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.id = nn.Identity()
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.id(self.fc(x)))


def minimal() -> tuple[nn.Module, Step]:
    model = nn.Sequential(nn.Linear(8, 8), PassBlock(), PassBlock(), nn.Linear(8, 1))
    x = torch.randn(4, 8)
    return model, lambda: model(x).sum()


CORPUS: dict[str, Callable[[], tuple[nn.Module, Step]]] = {
    "llama": llama,
    "gpt2": gpt2,
    "gpt2-dropout0": lambda: gpt2(dropout=0.0),
    "gpt2-checkpointing": lambda: gpt2(checkpointing=True),
    "bert": bert,
    "t5": t5,
    "mixtral": mixtral,
    "vit": vit,
    "moe": moe,
    "minimal": minimal,
}
