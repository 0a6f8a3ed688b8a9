"""Architectures (torchvision ResNet, CIFAR ResNet, ResNet-V2), weights and checkpoints."""
