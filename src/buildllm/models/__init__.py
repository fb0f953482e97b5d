"""The architectures, behind one interface (``registry``). Importing this package registers the
built-in ones: GPT-2 (``gpt2.py``), Llama 3 (``llama.py``) and Qwen3 (``qwen3.py``)."""

from buildllm.models import gpt2, llama, qwen3  # noqa: F401 - registers "gpt2", "llama", "qwen3"
from buildllm.models.registry import (  # noqa: F401
    all_presets,
    build,
    config_from_dict,
    count_parameters,
    describe,
    model_class,
    preset,
    register,
)
