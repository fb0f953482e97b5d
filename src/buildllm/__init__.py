"""buildllm: build, pretrain, fine-tune and run a GPT-style language model from scratch.

The package follows the pipeline, one module per stage:

    tokenizer   text to token ids (word-level, GPT-2 BPE, BPE trained on your corpus, Hugging
                Face tokenizer.json with its chat template)
    data        token ids to (input, target) training pairs; memory-mapped shards for big corpora
    models      the architectures (GPT-2, Llama 3, Qwen3) behind one registry: build, presets, counts
    training    pretraining loop, checkpoints, resume, many GPUs through torchrun
    generation  sampling (temperature, top-k, top-p), stop tokens, KV cache, streaming
    quantize    int8 and int4 weights for faster generation on CPU
    pretrained  published weights in and out (Hugging Face format: GPT-2, Llama 3, Qwen3)
    evaluate    loss, perplexity, bits per character, multiple choice
    finetune    classification, instruction and preference (DPO) fine-tuning
    lora        low-rank adapters
    serve       an OpenAI-compatible HTTP server with continuous batching, and a chat page
    attention_maps  what each attention head looks at, as numbers and heatmaps

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
    "HFTokenizer": "tokenizer",
    "ChatTemplate": "chat_template",
    "SlidingWindowDataset": "data.windows",
    "create_dataloader": "data.windows",
    "prepare_corpus": "data.prepare",
    "load_prepared": "data.prepare",
    "PreparedCorpus": "data.prepare",
    "get_batch": "data.windows",
    "shakespeare_plays": "data.shakespeare",
    "shakespeare_train_val": "data.shakespeare",
    "SHAKESPEARE_VAL_PLAYS": "data.shakespeare",
    "GPTConfig": "models.gpt2",
    "GPTModel": "models.gpt2",
    "PRESETS": "models.gpt2",
    "MultiHeadAttention": "models.gpt2",
    "TransformerBlock": "models.gpt2",
    "FeedForward": "models.gpt2",
    "LayerNorm": "models.gpt2",
    "GELU": "models.gpt2",
    "KVCache": "models.gpt2",
    "LlamaConfig": "models.llama",
    "LlamaModel": "models.llama",
    "Qwen3Config": "models.qwen3",
    "Qwen3Model": "models.qwen3",
    "RMSNorm": "models.blocks",
    "RotaryEmbedding": "models.blocks",
    "SwiGLU": "models.blocks",
    "ReLUSquared": "models.blocks",
    "GroupedQueryAttention": "models.blocks",
    "DecoderBlock": "models.blocks",
    "count_parameters": "models.registry",
    "describe": "models.registry",
    "register_arch": "models.registry",
    "build_model": "models.registry",
    "config_from_dict": "models.registry",
    "all_presets": "models.registry",
    "save_model": "weights.checkpoint",
    "load_model": "weights.loader",
    "LoadedModel": "weights.loader",
    "train": "training.engine",
    "TrainConfig": "training.config",
    "TrainResult": "training.engine",
    "plot_losses": "training.run_folder",
    "load_pretrained": "weights.loader",
    "save_pretrained": "weights.huggingface",
    "perplexity": "evaluate",
    "evaluate_text": "evaluate",
    "bits_per_character": "evaluate",
    "evaluate_multiple_choice": "evaluate",
    "load_multiple_choice": "evaluate",
    "LoRALayer": "finetune.lora",
    "LinearWithLoRA": "finetune.lora",
    "apply_lora": "finetune.lora",
    "merge_lora": "finetune.lora",
    "save_adapters": "finetune.lora",
    "load_adapters": "finetune.lora",
    "finetune_classifier": "finetune.classify",
    "finetune_instruct": "finetune.instruct",
    "finetune_dpo": "finetune.dpo",
    "DPOConfig": "finetune.dpo",
    "dpo_loss": "finetune.dpo",
    "read_preference_data": "finetune.preference_data",
    "adapters_disabled": "finetune.lora",
    "load_classifier": "finetune.classify",
    "Classifier": "finetune.classify",
    "PromptTemplate": "finetune.instruct",
    "get_prompt_template": "finetune.instruct",
    "load_prompt_template": "finetune.instruct",
    "read_labeled_texts": "finetune.classify",
    "read_instruction_data": "finetune.instruct",
    "collate_instruction": "finetune.instruct",
    "collate_classification": "finetune.classify",
    "generate": "generation.sampling",
    "stream": "generation.sampling",
    "stream_text": "generation.sampling",
    "sample_next_token": "generation.sampling",
    "detokenize": "generation.sampling",
    "prompt_ids": "generation.sampling",
    "chat_prompt": "generation.chat",
    "chat_ids": "generation.chat",
    "Int8Linear": "generation.quantization",
    "Int4Linear": "generation.quantization",
    "quantize": "generation.quantization",
    "ServeConfig": "serve.config",
    "create_app": "serve.app",
    "run_server": "serve.server",
    "BatchEngine": "serve.batching",
    "attention_weights": "attention_maps",
    "plot_attention": "attention_maps",
    "save_attention_map": "attention_maps",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"buildllm.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'buildllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
