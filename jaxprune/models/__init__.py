"""Reference Flax (linen) models with widths as arguments and ``from_params`` constructors.

Each model's ``from_params(variables)`` reads the widths back from a (possibly structurally
pruned) parameter tree, so a shrunk tree can be run without knowing how it was pruned.
BatchNorm statistics live in the ``batch_stats`` collection; call with ``train=True`` and
``mutable=["batch_stats"]`` to train.
"""
from jaxprune.models.mlp import MLP, mlpnet, two_layer_mlp
from jaxprune.models.mobilenet import MobileNetV1
from jaxprune.models.resnet import BasicBlock, CifarResNet, resnet18, resnet20
from jaxprune.models.transformer import BlockWidths, Transformer, transformer
from jaxprune.models.vgg import VGG, VGG11_CFG, vgg11_bn

__all__ = ["MLP", "mlpnet", "two_layer_mlp", "CifarResNet", "BasicBlock", "resnet20", "resnet18",
           "VGG", "VGG11_CFG", "vgg11_bn", "MobileNetV1",
           "Transformer", "BlockWidths", "transformer"]
