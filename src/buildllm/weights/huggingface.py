"""Stage 7: OpenAI's GPT-2 weights in and out of this codebase.

GPT-2 comes in three on-disk forms, and all three lead to the same place:

    "gpt2" (a model id) ──► huggingface_hub download ─┐
    Hugging Face folder: config.json + model.safetensors (or pytorch_model.bin)
                                                     ├─► HF names ──► our names ──► GPTModel
    OpenAI's TensorFlow folder: hparams.json + model.ckpt.* ──► HF names ─┘

Our model is GPT-2 itself, so the translation is only about names and one layout detail: OpenAI
wrote its linear layers as "Conv1D" (``x @ W + b`` with ``W`` of shape ``(in, out)``), while
``nn.Linear`` computes ``x @ W.T + b`` with ``W`` of shape ``(out, in)``. Those weights are
transposed on the way in and back on the way out. ``c_attn`` already holds queries, keys and
values side by side in that order, exactly like our fused ``att.qkv``, so nothing needs splitting.

Loading builds the model on the meta device (no memory) and moves each tensor straight into place
(``checkpoint.model_from_state_dict``, the one loading path of the package), converting one tensor
at a time, so peak memory stays near one copy of the weights.

``save_pretrained`` writes the Hugging Face layout back, so ``transformers.GPT2LMHeadModel
.from_pretrained(folder)`` reads a model trained here with identical logits.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from buildllm.errors import UserError
from buildllm.files import atomic_write, read_json_object
from buildllm.generation.quantization import refuse_quantized
from buildllm.models.gpt2 import GPTConfig, GPTModel
from buildllm.tokenizer import Tokenizer
from buildllm.weights.checkpoint import model_from_state_dict

# The model ids OpenAI published, and where they live on the Hugging Face Hub.
MODEL_IDS = {
    "gpt2": "openai-community/gpt2",  # 124M
    "gpt2-medium": "openai-community/gpt2-medium",  # 355M
    "gpt2-large": "openai-community/gpt2-large",  # 774M
    "gpt2-xl": "openai-community/gpt2-xl",  # 1558M
}


HF_CONFIG, HF_WEIGHTS, HF_WEIGHTS_BIN = "config.json", "model.safetensors", "pytorch_model.bin"


HF_INDEX = "model.safetensors.index.json"  # sharded safetensors: which file holds which tensor


TOKENIZER = "buildllm_tokenizer.json"  # ours, next to the HF files (HF's own tokenizer.json differs)


# Inside each block h.N (HF) / blocks.N (ours).
BLOCK_NAMES = {
    "norm1.scale": "ln_1.weight",
    "norm1.shift": "ln_1.bias",
    "att.qkv.weight": "attn.c_attn.weight",
    "att.qkv.bias": "attn.c_attn.bias",
    "att.out_proj.weight": "attn.c_proj.weight",
    "att.out_proj.bias": "attn.c_proj.bias",
    "norm2.scale": "ln_2.weight",
    "norm2.shift": "ln_2.bias",
    "ff.fc.weight": "mlp.c_fc.weight",
    "ff.fc.bias": "mlp.c_fc.bias",
    "ff.proj.weight": "mlp.c_proj.weight",
    "ff.proj.bias": "mlp.c_proj.bias",
}


TOP_NAMES = {
    "wte.weight": "wte.weight",
    "wpe.weight": "wpe.weight",
    "final_norm.scale": "ln_f.weight",
    "final_norm.shift": "ln_f.bias",
    "out_head.weight": "lm_head.weight",
}


# Buffers some HF files carry: the causal mask and the value masked scores get. Not weights.
HF_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


_HF_BLOCK = {hf: ours for ours, hf in BLOCK_NAMES.items()}


_HF_TOP = {hf: ours for ours, hf in TOP_NAMES.items()}


def to_hf_name(name: str) -> str:
    """Our parameter name -> the HF GPT-2 name without the ``transformer.`` prefix."""
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)", name):
        return f"h.{m[1]}.{BLOCK_NAMES[m[2]]}"
    return TOP_NAMES[name]


def from_hf_name(name: str) -> str | None:
    """HF GPT-2 name (``transformer.`` prefix optional) -> ours; None if GPT-2 has no such tensor."""
    name = name.removeprefix("transformer.")
    if m := re.fullmatch(r"h\.(\d+)\.(.+)", name):
        return f"blocks.{m[1]}.{_HF_BLOCK[m[2]]}" if m[2] in _HF_BLOCK else None
    return _HF_TOP.get(name)


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_conv1d(hf_name: str) -> bool:
    return hf_name.endswith(CONV1D)


def config_from_hf(hf: dict, source: str = HF_CONFIG, **overrides) -> GPTConfig:
    """A GPTConfig from a Hugging Face GPT-2 ``config.json``; refuses variants our model lacks.

    Missing keys take GPT2Config's defaults (the 124M model), as transformers does.
    """
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{source}: model_type {hf['model_type']!r} is not GPT-2; only GPT-2 weights load here")
    n_embd = hf.get("n_embd", 768)
    # Each entry: (key, GPT2Config's default, the values our model computes the same way).
    supported = [
        ("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh")),  # tanh GELU
        ("layer_norm_epsilon", 1e-5, (1e-5,)),
        ("n_inner", None, (None, 4 * n_embd)),
        ("scale_attn_weights", True, (True,)),
        ("scale_attn_by_inverse_layer_idx", False, (False,)),
    ]
    for key, default, allowed in supported:
        if hf.get(key, default) not in allowed:
            raise UserError(f"{source}: {key}={hf[key]!r} is not supported (buildllm's GPT-2 uses {allowed[0]!r})")
    settings = dict(
        vocab_size=hf.get("vocab_size", 50257),
        context_length=hf.get("n_positions", 1024),
        emb_dim=n_embd,
        n_heads=hf.get("n_head", 12),
        n_layers=hf.get("n_layer", 12),
        qkv_bias=True,  # GPT-2's c_attn always has a bias
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )
    try:
        return GPTConfig(**{**settings, **overrides})
    except TypeError as e:
        raise UserError(f"bad config override: {e}") from None


def config_to_hf(cfg: GPTConfig, eot_id: int | None = None) -> dict:
    """The ``config.json`` transformers expects for a GPT2LMHeadModel of this shape."""
    if eot_id is None and cfg.vocab_size > 50256:
        eot_id = 50256  # GPT-2's <|endoftext|>
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,  # the older name of n_positions, still read by some tools
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
    }


def model_from_hf_state(
    cfg: GPTConfig,
    state: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    source: str = "weights",
) -> GPTModel:
    """Turn HF-named tensors into a GPTModel. ``state`` is emptied as it goes (memory)."""
    # Keep only weights, under their names without the "transformer." prefix.
    hf_state: dict[str, torch.Tensor] = {}
    for name in list(state):
        short = name.removeprefix("transformer.")
        if HF_BUFFER.fullmatch(short):
            state.pop(name)
            continue
        if from_hf_name(short) is None:
            raise UserError(f"{source}: unexpected tensor {name!r} (GPT-2 has no such weight)")
        if short == "lm_head.weight" and cfg.tie_embeddings:
            state.pop(name)  # the output head is the token embedding (weight tying)
            continue
        hf_state[short] = state.pop(name)

    _check_names_and_shapes(cfg, hf_state, source)

    ours: dict[str, torch.Tensor] = {}
    for name in list(hf_state):
        tensor = hf_state.pop(name)  # one tensor at a time, so only one copy of the model exists
        if is_conv1d(name):
            tensor = tensor.t()
        if dtype is not None:
            tensor = tensor.to(dtype)
        ours[from_hf_name(name)] = tensor.contiguous()
    return model_from_state_dict(cfg, ours, device=device, source=source)


def _check_names_and_shapes(cfg: GPTConfig, hf_state: dict[str, torch.Tensor], source: str) -> None:
    """Name the first missing or mis-shaped tensor in HF's terms, the names the user's file has."""
    with torch.device("meta"):  # shapes only, no memory
        reference = GPTModel(cfg).state_dict()
    if cfg.tie_embeddings:
        reference.pop("out_head.weight")
    expected = {to_hf_name(name) for name in reference}
    for hf_name in hf_state:
        if hf_name not in expected:  # a GPT-2 name, but not of this shape: e.g. a 13th layer
            raise UserError(
                f"{source}: unexpected tensor {hf_name!r} (the config has {cfg.n_layers} layers, "
                f"{'tied' if cfg.tie_embeddings else 'untied'} output head)"
            )
    for name, tensor in reference.items():
        hf_name = to_hf_name(name)
        shape = tuple(tensor.shape[::-1]) if is_conv1d(hf_name) else tuple(tensor.shape)
        if hf_name not in hf_state:
            raise UserError(f"{source}: tensor {hf_name!r} is missing")
        if tuple(hf_state[hf_name].shape) != shape:
            raise UserError(
                f"{source}: tensor {hf_name!r} has shape {tuple(hf_state[hf_name].shape)}, "
                f"the config needs {shape}"
            )


def read_hf_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a Hugging Face folder (safetensors, sharded safetensors, or a .bin)."""
    if (directory / HF_WEIGHTS).is_file():
        files = [directory / HF_WEIGHTS]
    elif (directory / HF_INDEX).is_file():
        index = read_json_object(directory / HF_INDEX)
        try:
            files = [directory / f for f in sorted(set(index["weight_map"].values()))]
        except (KeyError, AttributeError, TypeError):
            raise UserError(f"{directory / HF_INDEX} has no weight_map; re-download the model") from None
    elif (directory / HF_WEIGHTS_BIN).is_file():
        path = directory / HF_WEIGHTS_BIN
        try:
            # weights_only: tensors and plain containers only, never arbitrary pickled objects
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle and zip raise many types; all mean "unreadable"
            raise UserError(f"cannot read {path} as plain tensors ({type(e).__name__}); re-download it") from None
        if not isinstance(state, dict):
            raise UserError(f"{path} does not hold a state dict of tensors")
        return state, str(path)
    else:
        raise UserError(f"{directory} has config.json but no {HF_WEIGHTS} or {HF_WEIGHTS_BIN}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_safetensors(path))
    return state, str(files[0]) if len(files) == 1 else str(directory)


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors file into ordinary memory, one tensor at a time.

    The format is simple: 8 bytes giving the header's length, a JSON header (name -> dtype,
    shape, byte range), then the raw little-endian bytes. ``safetensors.torch.load_file`` memory
    maps the file instead; the pages it touches then count as resident on top of the transposed
    copies we make, about 1.6x the weights at peak for GPT-2. Plain reads into each tensor's own
    buffer keep the peak near one copy of the weights (the page cache is the kernel's, not ours).
    """
    state = {}
    try:
        with open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_length))
            header.pop("__metadata__", None)
            for name, info in header.items():
                begin, end = info["data_offsets"]
                tensor = torch.empty(info["shape"], dtype=SAFETENSORS_DTYPES[info["dtype"]])
                raw = tensor.view(-1).view(torch.uint8).numpy()  # the tensor's bytes, writable
                if end - begin != raw.nbytes:
                    raise ValueError(f"tensor {name!r}: {end - begin} bytes for shape {info['shape']}")
                f.seek(8 + header_length + begin)
                if f.readinto(raw) != raw.nbytes:
                    raise ValueError(f"tensor {name!r} is cut short")
                state[name] = tensor
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"cannot read {path} ({e}); it is damaged or not safetensors, re-download it") from None
    return state


def download(model_id: str) -> Path:
    """Fetch a model's config.json and weights from the Hugging Face Hub (or its local cache)."""
    repo = MODEL_IDS.get(model_id, model_id)
    how = (
        f"with a network, run `hf download {repo} config.json model.safetensors --local-dir DIR` "
        "(pip install huggingface_hub) and pass DIR"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"downloading {model_id} needs huggingface_hub (pip install 'buildllm[hub]'), or {how}") from None
    try:
        # Prefer safetensors; fall back to the .bin only for repositories without it.
        folder = Path(snapshot_download(repo, allow_patterns=[HF_CONFIG, "*.safetensors", HF_INDEX]))
        if not (folder / HF_WEIGHTS).is_file() and not (folder / HF_INDEX).is_file():
            folder = Path(snapshot_download(repo, allow_patterns=[HF_CONFIG, HF_WEIGHTS_BIN]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, server down: all end here
        if type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            reason = "no network or HF_HUB_OFFLINE set, and not in the local cache"
        elif type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError"):
            reason = "no such public model on the Hub"
        else:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:120]
        raise UserError(f"cannot download {repo} ({reason}); {how}") from None
    return folder


def hf_state_of(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights under HF GPT-2 names, Conv1D weights transposed back to (in, out)."""
    refuse_quantized(model, "export")
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "out_head.weight" and model.cfg.tie_embeddings:
            continue  # transformers ties lm_head to wte itself
        hf_name = to_hf_name(name)
        tensor = tensor.detach()
        if is_conv1d(hf_name):
            tensor = tensor.t()
        key = hf_name if hf_name == "lm_head.weight" else f"transformer.{hf_name}"
        state[key] = tensor.contiguous().cpu()
    if not model.cfg.qkv_bias:
        # GPT-2 always has a c_attn bias: a zero bias computes the same thing.
        for i, block in enumerate(model.blocks):
            state[f"transformer.h.{i}.attn.c_attn.bias"] = block.att.qkv.weight.new_zeros(3 * model.cfg.emb_dim).cpu()
    return state


def save_pretrained(model: GPTModel, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 folder (config.json + model.safetensors).

    ``transformers.GPT2LMHeadModel.from_pretrained(directory)`` loads it with identical logits,
    and so does ``load_pretrained``. A tokenizer is kept as ``buildllm_tokenizer.json``; a
    byte-level BPE one (GPT-2's, or one from ``train_bpe``) is also written in GPT-2's own files,
    vocab.json and merges.txt, which ``transformers.AutoTokenizer`` loads.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = config_to_hf(model.cfg, getattr(tokenizer, "eot_id", None))
    config["torch_dtype"] = str(model.wte.weight.dtype).removeprefix("torch.")
    state = hf_state_of(model)
    # metadata "format": "pt" tells transformers these are PyTorch tensors (it refuses files without it)
    atomic_write(directory / HF_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(directory / HF_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    if tokenizer is not None:
        from buildllm.tokenizer import GPT2_PATTERN, BPETokenizer

        tokenizer.save(directory / TOKENIZER)  # atomic itself
        if isinstance(tokenizer, BPETokenizer) and tokenizer.pat_str == GPT2_PATTERN:
            save_hf_tokenizer(tokenizer, directory, model.cfg.context_length)
    return directory


def save_hf_tokenizer(tokenizer: Tokenizer, directory: Path, context_length: int) -> None:
    """vocab.json, merges.txt and tokenizer_config.json: the files of transformers' GPT2Tokenizer."""
    from buildllm.tokenizer import EOT

    vocab, merges = tokenizer.to_vocab_and_merges()
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length, "add_prefix_space": False,
              "bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    atomic_write(directory / "vocab.json", lambda tmp: Path(tmp).write_text(json.dumps(vocab, ensure_ascii=False),
                                                                             encoding="utf-8"))
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    atomic_write(directory / "merges.txt", lambda tmp: Path(tmp).write_text(merges_text, encoding="utf-8"))
    atomic_write(directory / "tokenizer_config.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Turn a buildllm checkpoint folder into a Hugging Face GPT-2 folder (``buildllm convert``)."""
    from buildllm.weights.checkpoint import load_model

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder to write the Hugging Face model into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; choose another folder or add --force to overwrite its files")
    model, tokenizer = load_model(checkpoint)
    return save_pretrained(model, out, tokenizer)
