"""buildllm: build, pretrain, fine-tune and run a GPT-style language model from scratch.

The package follows the pipeline, one module per stage:

    tokenizer   text to token ids (word-level, GPT-2 BPE, BPE trained on your corpus)
    data        token ids to (input, target) training pairs; memory-mapped shards for big corpora
    model       embeddings, causal multi-head attention, the GPT-2 architecture
    training    pretraining loop, checkpoints, resume, many GPUs through torchrun
    generation  sampling (temperature, top-k, top-p), stop tokens, KV cache, streaming
    quantize    int8 and int4 weights for faster generation on CPU
    pretrained  OpenAI's GPT-2 weights in and out (Hugging Face format)
    evaluate    loss, perplexity, bits per character, multiple choice
    finetune    classification and instruction fine-tuning
    lora        low-rank adapters

Everything public is importable from ``buildllm`` directly; modules load on first use so that
``import buildllm`` (and the CLI's ``--help``) stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "UserError": "errors",
    "Tokenizer": "tokenizer",
    "WordTokenizer": "tokenizer",
    "BPETokenizer": "tokenizer",
    "get_tokenizer": "tokenizer",
    "train_bpe": "tokenizer",
    "SlidingWindowDataset": "data",
    "create_dataloader": "data",
    "prepare_corpus": "data",
    "load_prepared": "data",
    "PreparedCorpus": "data",
    "get_batch": "data",
    "shakespeare_plays": "data",
    "shakespeare_train_val": "data",
    "SHAKESPEARE_VAL_PLAYS": "data",
    "GPTConfig": "model",
    "GPTModel": "model",
    "PRESETS": "model",
    "MultiHeadAttention": "model",
    "TransformerBlock": "model",
    "FeedForward": "model",
    "LayerNorm": "model",
    "GELU": "model",
    "KVCache": "model",
    "count_parameters": "model",
    "describe": "model",
    "save_model": "checkpoint",
    "load_model": "checkpoint",
    "train": "training",
    "TrainConfig": "training",
    "TrainResult": "training",
    "load_config": "training",
    "plot_losses": "training",
    "load_pretrained": "pretrained",
    "save_pretrained": "pretrained",
    "perplexity": "evaluate",
    "evaluate_text": "evaluate",
    "bits_per_character": "evaluate",
    "evaluate_multiple_choice": "evaluate",
    "load_multiple_choice": "evaluate",
    "LoRALayer": "lora",
    "LinearWithLoRA": "lora",
    "apply_lora": "lora",
    "merge_lora": "lora",
    "save_adapters": "lora",
    "load_adapters": "lora",
    "finetune_classifier": "finetune",
    "finetune_instruct": "finetune",
    "load_classifier": "finetune",
    "Classifier": "finetune",
    "PromptTemplate": "finetune",
    "get_prompt_template": "finetune",
    "load_prompt_template": "finetune",
    "read_labeled_texts": "finetune",
    "read_instruction_data": "finetune",
    "collate_instruction": "finetune",
    "collate_classification": "finetune",
    "generate": "generation",
    "stream": "generation",
    "stream_text": "generation",
    "sample_next_token": "generation",
    "detokenize": "generation",
    "Int8Linear": "quantize",
    "Int4Linear": "quantize",
    "quantize": "quantize",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"buildllm.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'buildllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
