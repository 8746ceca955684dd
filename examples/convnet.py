"""A small conv net's Jacobian w.r.t. an image: (10,) logits x (3, 32, 32) pixels.

`raijac compute examples/convnet.py:problem --out conv.zarr`
"""

import torch

import raijac


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(16 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.head(h.flatten(-3))


def problem() -> raijac.Problem:
    torch.manual_seed(0)
    return raijac.Problem(ConvNet(), torch.randn(3, 32, 32))
