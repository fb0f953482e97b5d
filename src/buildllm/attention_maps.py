"""What each attention head looks at: the weights after the softmax, as numbers and as heatmaps.

``attention_weights(model, ids)`` runs one forward pass and returns every layer's attention
weights, ``(layers, heads, tokens, tokens)``: row ``i`` of a head's matrix is how query ``i``
shares its attention among keys ``0..i`` (the causal mask leaves the upper triangle at zero).
``plot_attention`` draws one layer as one heatmap per head, and ``save_attention_map`` does both for
a prompt and writes the picture (``buildllm attention``).

Nothing here knows an architecture. A model offers its weights through a hook on its attention
modules: an attribute ``attention_recorder``, None by default; while it holds a callable, the
module computes its weights explicitly and calls ``attention_recorder(layer, weights)`` with
weights of shape ``(batch, heads, queries, keys)`` (GPT-2's ``MultiHeadAttention`` shows how).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from buildllm.errors import UserError
from buildllm.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HOOK = "attention_recorder"
MAX_LABELLED_TOKENS = 40  # beyond this the token labels overlap: panels show positions instead
PICTURE_FORMATS = ("png", "svg", "pdf")


def attention_weights(model: nn.Module, ids) -> torch.Tensor:
    """Every layer's attention weights for one sequence of token ids: ``(layers, heads, T, T)``.

    The model runs once in eval mode (no dropout on the weights) and without gradients; its
    training mode is restored afterwards. The weights come back as float32 on the CPU.
    """
    modules = [m for m in model.modules() if hasattr(m, HOOK)]
    if not modules:
        raise UserError(f"{type(model).__name__} offers no attention weights: its attention modules have no "
                        f"{HOOK} hook (see buildllm.attention_maps)")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise UserError("no tokens to look at: give a non-empty prompt")
    context = getattr(getattr(model, "cfg", None), "context_length", None)
    if context is not None and ids.shape[1] > context:
        raise UserError(f"the prompt is {ids.shape[1]} tokens and the model's context holds {context}: shorten it")

    recorded: dict[int, torch.Tensor] = {}

    def record(layer: int, weights: torch.Tensor) -> None:
        recorded[layer] = weights[0].detach().float().cpu()

    was_training = model.training
    model.eval()
    for module in modules:
        setattr(module, HOOK, record)
    try:
        with torch.no_grad():
            model(ids.to(next(model.parameters()).device))
    finally:
        for module in modules:
            setattr(module, HOOK, None)
        model.train(was_training)
    return torch.stack([recorded[layer] for layer in sorted(recorded)])


def token_labels(tokenizer, ids) -> list[str]:
    """Each token's own text, with line breaks and tabs made visible, for a heatmap's axes."""
    return [tokenizer.decode([int(i)]).replace("\n", "\\n").replace("\t", "\\t") for i in ids]


def plot_attention(weights: torch.Tensor, tokens: list[str] | None = None, title: str | None = None,
                   columns: int = 4) -> Figure:
    """One layer's weights ``(heads, T, T)`` as one heatmap per head, queries down, keys across.

    ``tokens`` label the axes (up to 40 tokens; longer sequences show positions). Every panel
    shares one colour scale, 0 to 1, so heads can be compared at a glance. Returns the figure
    (a plain ``matplotlib.figure.Figure``: no pyplot state, any backend).
    """
    from matplotlib.figure import Figure

    if weights.dim() != 3 or weights.shape[1] != weights.shape[2]:
        raise UserError(f"attention weights of one layer are (heads, tokens, tokens), got {tuple(weights.shape)}")
    heads, n = weights.shape[0], weights.shape[1]
    cols = min(heads, columns)
    rows = math.ceil(heads / cols)
    panel = min(5.0, 2.2 + 0.09 * n)  # inches: room for the labels of longer prompts
    fig = Figure(figsize=(cols * panel + 1.0, rows * panel + (0.5 if title else 0.2)), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flat
    labelled = tokens is not None and n <= MAX_LABELLED_TOKENS
    size = 9 if n <= 12 else 7 if n <= 24 else 5
    for h, ax in enumerate(axes):
        if h >= heads:
            ax.remove()
            continue
        image = ax.imshow(weights[h].float().numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"head {h}", fontsize=10)
        if labelled:
            ax.set_xticks(range(n), tokens, rotation=90, fontsize=size)
            ax.set_yticks(range(n), tokens, fontsize=size)
        else:
            ax.set_xlabel("key position", fontsize=8)
            ax.set_ylabel("query position", fontsize=8)
    fig.colorbar(image, ax=[ax for ax in fig.axes], shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title)
    return fig


def save_attention_map(model: nn.Module, tokenizer, prompt: str, path: str | os.PathLike, layer: int = -1,
                       dpi: int = 100) -> Figure:
    """Draw ``layer``'s heads for ``prompt`` (negative counts from the last layer) and write the
    picture to ``path`` (.png, .svg or .pdf, written atomically); return the figure."""
    kind = Path(path).suffix.lstrip(".").lower()
    if kind not in PICTURE_FORMATS:
        raise UserError(f"cannot draw into {path}: give a file name ending in " + ", ".join(f".{k}" for k in PICTURE_FORMATS))
    ids = tokenizer.encode(prompt)
    weights = attention_weights(model, ids)
    n_layers = weights.shape[0]
    if not -n_layers <= layer < n_layers:
        raise UserError(f"layer {layer} does not exist: the model has {n_layers} layers (0 to {n_layers - 1}, "
                        "or -1 for the last)")
    shown = prompt if len(prompt) <= 50 else prompt[:47] + "..."
    fig = plot_attention(weights[layer], token_labels(tokenizer, ids),
                         title=f"layer {layer % n_layers} of {n_layers}: {shown!r}")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=kind, dpi=dpi))
    return fig
