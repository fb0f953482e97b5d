"""Stage 7: published weights in and out of this codebase: GPT-2, Llama 3, Qwen3 (Hugging Face folders).

A Hugging Face folder is ``config.json`` (its ``model_type`` and ``architectures`` name the
architecture) and the weights, in ``model.safetensors``, in shards listed by
``model.safetensors.index.json``, or in a ``pytorch_model.bin``. GPT-2 comes in three on-disk
forms, and all three lead to the same place:

    "gpt2" (a model id) ──► huggingface_hub download ─┐
    Hugging Face folder: config.json + model.safetensors (or pytorch_model.bin)
                                                     ├─► HF names ──► our names ──► GPTModel
    OpenAI's TensorFlow folder: hparams.json + model.ckpt.* ──► HF names ─┘

The translation is about names and which weights are stored transposed. Each architecture keeps
its own map beside its model (``models/gpt2_hf.py`` for GPT-2), registered with it; this file reads
and writes Hugging Face folders for any of them, picking the map by the config's ``arch`` (writing)
or the folder's ``model_type`` (reading).

Loading builds the model on the meta device (no memory) and moves each tensor straight into place
(``checkpoint.model_from_state_dict``, the one loading path of the package), converting one tensor
at a time, so peak memory stays near one copy of the weights. The weights keep the dtype they are
stored in (a bf16 Llama stays bf16) unless a dtype is asked for.

``save_pretrained`` writes the Hugging Face layout back, so ``transformers.AutoModelForCausalLM
.from_pretrained(folder)`` reads a model trained here (GPT2LMHeadModel, LlamaForCausalLM,
Qwen3ForCausalLM) with identical logits.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from buildllm.errors import UserError
from buildllm.files import atomic_write, read_json_object, write_json, write_safetensors
from buildllm.generation.quantization import refuse_quantized
from buildllm.models import registry
from buildllm.tokenizer import Tokenizer
from buildllm.weights.checkpoint import (
    model_from_state_dict,
    tied_parameters,
    weights_of,
)

# The model ids OpenAI published, and where they live on the Hugging Face Hub.
MODEL_IDS = {
    "gpt2": "openai-community/gpt2",  # 124M
    "gpt2-medium": "openai-community/gpt2-medium",  # 355M
    "gpt2-large": "openai-community/gpt2-large",  # 774M
    "gpt2-xl": "openai-community/gpt2-xl",  # 1558M
}


HF_CONFIG, HF_WEIGHTS, HF_WEIGHTS_BIN = "config.json", "model.safetensors", "pytorch_model.bin"


HF_INDEX = "model.safetensors.index.json"  # sharded safetensors: which file holds which tensor

# What a download brings beside the weights: the tokenizer, its chat template and stop tokens.
HF_TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja")


TOKENIZER = "buildllm_tokenizer.json"  # ours, next to the HF files (HF's own tokenizer.json differs)


# The name maps themselves belong to each architecture (models/gpt2_hf.py for GPT-2): the code
# below reads and writes any architecture's Hugging Face folder through its map.


def hf_format_of(cfg):
    """The Hugging Face weight map of ``cfg``'s architecture, once it has checked that its model
    class can hold ``cfg`` (``check_config``: GPT-2's refuses the speedrun's levers)."""
    fmt = registry.get(cfg.arch).hf_format
    if fmt is None:
        raise UserError(f"architecture {cfg.arch!r} has no Hugging Face format; save it with save_model instead")
    if hasattr(fmt, "check_config"):
        fmt.check_config(cfg)
    return fmt


def config_from_hf(hf: dict, source: str = HF_CONFIG, **overrides):
    """Our config from a Hugging Face ``config.json``, by its ``model_type``."""
    return registry.hf_format_for(hf.get("model_type", "gpt2")).config_from_hf(hf, source, **overrides)


def config_to_hf(cfg, eot_id: int | None = None) -> dict:
    """The ``config.json`` transformers expects for this config."""
    return hf_format_of(cfg).config_to_hf(cfg, eot_id)


def model_from_hf_state(
    cfg,
    state: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    source: str = "weights",
) -> nn.Module:
    """Turn HF-named tensors into ``cfg``'s model, converted to ``dtype`` unless None. ``state`` is
    emptied as it goes (memory)."""
    fmt = hf_format_of(cfg)
    with torch.device("meta"):  # shapes only, no memory
        reference = registry.build(cfg)
    tied = tied_parameters(reference)
    # Keep only weights, under their canonical HF names (a file may omit a prefix).
    hf_state: dict[str, torch.Tensor] = {}
    for name in list(state):
        if fmt.is_buffer(name):
            state.pop(name)
            continue
        ours = fmt.from_hf_name(name)
        if ours is None:
            raise UserError(f"{source}: unexpected tensor {name!r} ({cfg.arch} has no such weight)")
        if ours in tied:
            state.pop(name)  # e.g. the output head is the token embedding (weight tying)
            continue
        hf_state[fmt.to_hf_name(ours)] = state.pop(name)

    _check_names_and_shapes(cfg, fmt, reference, tied, hf_state, source)

    ours: dict[str, torch.Tensor] = {}
    for name in list(hf_state):
        tensor = hf_state.pop(name)  # one tensor at a time, so only one copy of the model exists
        if fmt.is_transposed(name):
            tensor = tensor.t()
        if dtype is not None:
            tensor = tensor.to(dtype)
        ours[fmt.from_hf_name(name)] = tensor.contiguous()
    return model_from_state_dict(cfg, ours, device=device, source=source)


def _check_names_and_shapes(cfg, fmt, reference: nn.Module, tied: dict, hf_state: dict, source: str) -> None:
    """Name the first missing or mis-shaped tensor in HF's terms, the names the user's file has."""
    reference = {name: t for name, t in reference.state_dict().items() if name not in tied}
    expected = {fmt.to_hf_name(name) for name in reference}
    for hf_name in hf_state:
        if hf_name not in expected:  # a known name, but not of this shape: e.g. a 13th layer
            raise UserError(
                f"{source}: unexpected tensor {hf_name!r} (the config has {cfg.n_layers} layers, "
                f"{'tied' if cfg.tie_embeddings else 'untied'} output head)"
            )
    for name, tensor in reference.items():
        hf_name = fmt.to_hf_name(name)
        shape = tuple(tensor.shape[::-1]) if fmt.is_transposed(hf_name) else tuple(tensor.shape)
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
    """The tensors of a .safetensors file, memory-mapped: each is a view of the file's pages.

    The format is simple: 8 bytes giving the header's length, a JSON header (name -> dtype,
    shape, byte range), then the raw little-endian bytes. The file is mapped privately
    (copy-on-write) and never copied, so a page becomes resident only when a tensor on it is first
    used, and loading holds one copy of the weights at most; a tensor the model changes in place
    (a LoRA merge, say) gets its own pages, and the file stays as it was. (``safetensors``' own
    ``load_file`` copies every tensor out of its mapping, holding the file twice at the peak.)
    """
    state = {}
    try:
        with open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_length))
        header.pop("__metadata__", None)
        size = path.stat().st_size
        data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8) if size else None
        start = 8 + header_length
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            raw = data[start + begin : start + end] if end > begin else torch.empty(0, dtype=torch.uint8)
            if start + end > size:
                raise ValueError(f"tensor {name!r} is cut short")
            if raw.numel() != math.prod(info["shape"]) * dtype.itemsize:
                raise ValueError(f"tensor {name!r}: {end - begin} bytes for shape {info['shape']}")
            if raw.storage_offset() % dtype.itemsize:  # not aligned to its type (rare): copy it
                raw = raw.clone()
            state[name] = raw.view(dtype).view(info["shape"])
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read {path} ({e}); it is damaged or not safetensors, re-download it") from None
    return state


def download(model_id: str) -> Path:
    """Fetch a model's config.json, weights and tokenizer files from the Hugging Face Hub (or its cache)."""
    repo = MODEL_IDS.get(model_id, model_id)
    how = (
        f"with a network, run `hf download {repo} --include '*.json' '*.safetensors' '*.jinja' --local-dir DIR` "
        "(pip install huggingface_hub) and pass DIR"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"downloading {model_id} needs huggingface_hub (pip install 'buildllm[hub]'), or {how}") from None
    try:
        # Prefer safetensors; fall back to the .bin only for repositories without it.
        folder = Path(snapshot_download(repo, allow_patterns=[HF_CONFIG, "*.safetensors", HF_INDEX, *HF_TEXT_FILES]))
        if not (folder / HF_WEIGHTS).is_file() and not (folder / HF_INDEX).is_file():
            folder = Path(snapshot_download(repo, allow_patterns=[HF_CONFIG, HF_WEIGHTS_BIN, *HF_TEXT_FILES]))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, server down: all end here
        if type(e).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            reason = "no network or HF_HUB_OFFLINE set, and not in the local cache"
        elif type(e).__name__ == "GatedRepoError":
            reason = "a gated model: accept its licence on huggingface.co, then `hf auth login`"
        elif type(e).__name__ == "RepositoryNotFoundError":
            reason = "no such public model on the Hub"
        else:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:120]
        raise UserError(f"cannot download {repo} ({reason}); {how}") from None
    return folder


def hf_state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under its architecture's HF names, transposed where HF stores (in, out)."""
    refuse_quantized(model, "export")
    fmt = hf_format_of(model.cfg)
    state = {}
    for name, tensor in weights_of(model).items():  # tied parameters once: transformers ties them itself
        hf_name = fmt.to_hf_name(name)
        state[hf_name] = tensor.t() if fmt.is_transposed(hf_name) else tensor
    state.update(fmt.extra_hf_tensors(model))
    return state


def save_pretrained(model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` as a Hugging Face folder of its architecture (config.json + model.safetensors).

    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads it with identical logits,
    and so does ``load_pretrained``. A tokenizer is kept as ``buildllm_tokenizer.json``; a
    byte-level BPE one (GPT-2's, or one from ``train_bpe``) is also written in GPT-2's own files,
    vocab.json and merges.txt, and a Hugging Face one (Llama's, Qwen's) as tokenizer.json and
    tokenizer_config.json with its chat template, plus generation_config.json with its stop ids:
    what ``transformers.AutoTokenizer`` and ``generate`` read.
    """
    directory = Path(directory)
    config = config_to_hf(model.cfg, getattr(tokenizer, "eot_id", None))  # refuses what HF cannot hold
    directory.mkdir(parents=True, exist_ok=True)
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    state = hf_state_of(model)
    write_safetensors(directory / HF_WEIGHTS, state)
    write_json(directory / HF_CONFIG, config)
    if tokenizer is not None:
        from buildllm.tokenizer import GPT2_PATTERN, BPETokenizer

        tokenizer.save(directory / TOKENIZER)  # atomic itself
        from buildllm.tokenizer.huggingface import GENERATION_CONFIG, HFTokenizer

        if isinstance(tokenizer, BPETokenizer) and tokenizer.pat_str == GPT2_PATTERN:
            save_hf_tokenizer(tokenizer, directory, model.cfg.context_length)
        elif isinstance(tokenizer, HFTokenizer):
            tokenizer.save_hf_files(directory)
            generation = {**tokenizer.generation_config, "eos_token_id": list(tokenizer.stop_ids)}
            if getattr(tokenizer, "bos_id", None) is not None:
                generation["bos_token_id"] = tokenizer.bos_id
            write_json(directory / GENERATION_CONFIG, generation)
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
    write_json(directory / "tokenizer_config.json", config)
