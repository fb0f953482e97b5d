"""What shortcut (residual) connections are for: gradients that reach the first layers.

A deep stack of Linear + GELU layers, trained by backpropagation, passes its gradient through every
layer on the way down. Without shortcuts the gradient shrinks layer by layer (it "vanishes"); with
``x = x + layer(x)`` each layer also hands the gradient straight through, so the first layers learn
as well as the last. The transformer blocks in ``buildllm.model`` wrap attention and feed-forward
in exactly such shortcuts.

    python examples/shortcut_connections.py
"""

import torch
from torch import nn

from buildllm.models.gpt2 import GELU


class DeepNetwork(nn.Module):
    def __init__(self, layer_sizes: list[int], use_shortcut: bool):
        super().__init__()
        self.use_shortcut = use_shortcut
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(n_in, n_out), GELU()) for n_in, n_out in zip(layer_sizes, layer_sizes[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            out = layer(x)
            x = x + out if self.use_shortcut and x.shape == out.shape else out
        return x


def gradient_norms(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Mean absolute gradient of each layer's weight after one backward pass of an MSE loss."""
    loss = nn.functional.mse_loss(model(x), torch.zeros(1, 1))
    loss.backward()
    return [layer[0].weight.grad.abs().mean().item() for layer in model.layers]


def main() -> None:
    layer_sizes = [3, 3, 3, 3, 3, 1]
    x = torch.tensor([[1.0, 0.0, -1.0]])
    for use_shortcut in (False, True):
        torch.manual_seed(123)
        norms = gradient_norms(DeepNetwork(layer_sizes, use_shortcut), x)
        print(f"{'with' if use_shortcut else 'without'} shortcut connections:")
        for i, g in enumerate(norms):
            print(f"  layer {i}: mean |grad| = {g:.6f}")
    print("Without shortcuts the gradient fades towards the first layer; with them it stays large.")


if __name__ == "__main__":
    main()
