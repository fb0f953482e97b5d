"""A new architecture is one model file: register it, and training, resume, generation with the KV
cache, quantization, LoRA, saving and loading all work with it, unchanged.

The toy architecture below lives in this test file on purpose: it proves nothing in the package
names GPT-2 where it should ask the model. It differs from GPT-2 where later architectures do: no
position embedding (causal attention alone orders the tokens), RMSNorm instead of LayerNorm, a gated
(SwiGLU) feed-forward with differently named layers, and an untied output head.
"""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import buildllm
from buildllm import TrainConfig, train
from buildllm.errors import UserError
from buildllm.finetune.lora import apply_lora, lora_layers
from buildllm.generation.quantization import Int8Linear, quantize
from buildllm.generation.sampling import generate
from buildllm.models import registry
from buildllm.models.gpt2 import GPTConfig, MultiHeadAttention
from buildllm.models.layers import KVCache
from buildllm.weights.checkpoint import save_model
from buildllm.weights.loader import load_model

# The toy architecture ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyConfig(GPTConfig):
    arch: str = "toy"
    hidden_mult: int = 2  # feed-forward width, in multiples of emb_dim
    tie_embeddings: bool = False


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        hidden = cfg.hidden_mult * cfg.emb_dim
        self.gate = nn.Linear(cfg.emb_dim, hidden, bias=False)
        self.up = nn.Linear(cfg.emb_dim, hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.emb_dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ToyBlock(nn.Module):
    def __init__(self, cfg: ToyConfig, layer: int):
        super().__init__()
        self.norm1, self.att = RMSNorm(cfg.emb_dim), MultiHeadAttention(cfg, layer)  # shared attention
        self.norm2, self.mlp = RMSNorm(cfg.emb_dim), SwiGLU(cfg)

    def forward(self, x, kv_cache=None):
        x = x + self.att(self.norm1(x), kv_cache)
        return x + self.mlp(self.norm2(x))


class ToyModel(nn.Module):
    lora_targets = ("qkv", "out_proj", "gate", "up", "down")

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.blocks = nn.ModuleList(ToyBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, kv_cache=None, padding=None, last_only=False):
        if padding is not None and padding.any():
            raise UserError("the toy architecture does not take padded batches")
        end = (kv_cache.length if kv_cache is not None else 0) + idx.shape[1]
        if end > self.cfg.context_length:
            raise UserError(f"input of {end} tokens exceeds the context length {self.cfg.context_length}")
        x = self.tok(idx)  # no position embedding: the causal mask alone tells positions apart
        for block in self.blocks:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.length = end
        return self.out_head(self.norm(x[:, -1:] if last_only else x))

    @property
    def device(self):
        return self.tok.weight.device

    def init_buffers(self, device=None):
        for block in self.blocks:
            block.att.mask = torch.ones(self.cfg.context_length, self.cfg.context_length, dtype=torch.bool,
                                        device=device).triu(1)

    def new_kv_cache(self, batch_size, max_length=None, device=None, dtype=torch.float32):
        return KVCache(self.cfg, batch_size, max_length, device=device or self.device, dtype=dtype)

    @staticmethod
    def count_parameters(cfg):
        d, v, n, h = cfg.emb_dim, cfg.vocab_size, cfg.n_layers, cfg.hidden_mult * cfg.emb_dim
        attention = 3 * d * d + (3 * d if cfg.qkv_bias else 0) + d * d + d
        block = attention + 3 * d * h + 2 * d
        total = v * d + n * block + d + v * d
        return {"total": total, "embedding": v * d, "head": v * d, "non_embedding": total - 2 * v * d}

    @staticmethod
    def flops_per_token(cfg):
        matmul = ToyModel.count_parameters(cfg)["non_embedding"] + cfg.vocab_size * cfg.emb_dim
        attention = 12 * cfg.n_layers * cfg.emb_dim * cfg.context_length
        return {"train": 6 * matmul + attention, "forward": 2 * matmul + attention // 3}


TOY_PRESETS = {"toy-nano": ToyConfig(vocab_size=300, context_length=32, emb_dim=32, n_heads=2, n_layers=2)}
registry.register("toy", ToyModel, ToyConfig, TOY_PRESETS)


# Tests ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(play_corpus):
    """Train the toy 6 steps straight, and 3 steps then 3 more on resume, through buildllm.train."""
    files = play_corpus("macbeth", 12000)
    root = Path(files["book"]).parent
    common = dict(data=files["book"], recipe="book", tokenizer=files["tokenizer"], preset="toy-nano",
                  model={"drop_rate": 0.0}, batch_size=8, context_length=32, eval_interval=3, eval_iters=1,
                  lr=3e-3, lr_schedule="constant", progress=False, sample_tokens=0, dtype="fp32", device="cpu")
    straight = train(TrainConfig(out=str(root / "a"), max_steps=6, **common))
    train(TrainConfig(out=str(root / "b"), max_steps=3, **common))
    resumed = train(TrainConfig(out=str(root / "b"), max_steps=6, resume=True, **common))
    return root, straight, resumed


def test_registry_builds_presets_configs_and_counts_by_arch():
    cfg = GPTConfig.from_preset("toy-nano", n_layers=3)
    assert type(cfg) is ToyConfig and cfg.n_layers == 3
    model = registry.build(cfg)
    assert isinstance(model, ToyModel)
    assert registry.config_from_dict(cfg.to_dict()) == cfg
    unique = sum(p.numel() for p in model.parameters())
    assert buildllm.count_parameters(cfg)["total"] == unique
    # Training asks for FLOPs this way (engine.py): it must reach the toy's own count.
    from buildllm.models.gpt2 import describe

    flops = describe(dataclasses.replace(cfg, context_length=16))["train_flops_per_token"]
    assert flops == ToyModel.flops_per_token(dataclasses.replace(cfg, context_length=16))["train"]
    with pytest.raises(UserError, match="unknown architecture 'nope'"):
        registry.config_from_dict({"arch": "nope"})


def test_train_and_resume_equal_training_straight(trained):
    root, straight, resumed = trained
    assert (root / "a/model.safetensors").read_bytes() == (root / "b/model.safetensors").read_bytes()
    assert resumed.val_loss == straight.val_loss and math.isfinite(straight.val_loss)


def test_saved_run_reloads_and_generates_with_and_without_cache(trained, tmp_path):
    root, _, _ = trained
    model, tokenizer = buildllm.load_model(root / "a")  # the one loader: a run folder
    assert isinstance(model, ToyModel) and tokenizer is not None
    prompt = torch.tensor([tokenizer.encode("Macbeth")])
    cached = generate(model, prompt, max_new_tokens=20)
    assert torch.equal(cached, generate(model, prompt, max_new_tokens=20, use_cache=False))
    save_model(tmp_path / "again", model, tokenizer)
    again, _ = load_model(tmp_path / "again")
    assert torch.equal(again(prompt), model(prompt))


def test_int8_and_lora_work_on_the_toy(trained):
    root, _, _ = trained
    model, tokenizer = buildllm.load_model(root / "a")
    prompt = torch.tensor([tokenizer.encode("Macbeth")])
    reference = model(prompt)
    q, _ = buildllm.load_model(root / "a", quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in q.modules())
    assert torch.allclose(q(prompt), reference, atol=0.05)
    assert torch.equal(generate(q, prompt, 10, fast=False), generate(q, prompt, 10, use_cache=False))

    apply_lora(model, rank=2, alpha=4)  # the arch's own default targets
    names = {name.rpartition(".")[2] for name in lora_layers(model)}
    assert names == set(ToyModel.lora_targets)
    assert torch.equal(model(prompt), reference)  # B = 0: the adapted model starts where the base was
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora." in n for n in trainable)
    quantize(model, "int8")  # the frozen base layers inside the adapters quantize too
