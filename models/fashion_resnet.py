"""A small ResNet, trained from scratch on Fashion-MNIST: 28×28 grey clothing images, 10 classes.

Clients send raw uint8 pixels (or PNG files): `preprocess = "pixels"` scales and standardizes them inside
the model, with statistics fitted on the training split, so every variant and serving do the same.
"""

from torch import nn

from models.datasets import fashion_mnist as load_data

__all__ = ["build", "load_data", "preprocess"]

preprocess = "pixels"


class Residual(nn.Module):
    """Two 3×3 convolutions with batch norm, added to a (projected) shortcut."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(),
            nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs))
        self.shortcut = nn.Identity() if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs))
        self.out = nn.ReLU()

    def forward(self, x):
        return self.out(self.body(x) + self.shortcut(x))


def build(width: int = 32, blocks: int = 2, dropout: float = 0.1, num_classes: int = 10,
          input_shape: tuple = (28, 28)) -> nn.Module:
    """Three stages (28×28, 14×14, 7×7 on Fashion-MNIST) of `blocks` residual blocks, widths ×1, ×2, ×4. Any
    image size and channel count (grey (H, W), or (C, H, W)): an image folder's colour pictures train too."""
    colours = input_shape[0] if len(input_shape) == 3 else 1
    layers: list[nn.Module] = [nn.Conv2d(colours, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    channels = width
    for stage, multiple in enumerate((1, 2, 4)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(Residual(channels, width * multiple, stride))
            channels = width * multiple
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)
