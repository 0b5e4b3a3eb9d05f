"""Parameter counts of well-known ImageNet models (1000-class heads), so that a plan needs no model
build and no torch. Counted from torchvision's constructors; Inception V3 without its auxiliary
head, as Keras Applications lists it. Models of `largebatch.models` whose size depends on the input
(small_cnn, the CIFAR ResNets) are sized by `--measure`, or given with `--params`."""

from __future__ import annotations

PARAMETERS: dict[str, int] = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "inception_v3": 23_851_784,
    "vgg16": 138_357_544,
    "alexnet": 61_100_840,
}
