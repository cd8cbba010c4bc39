"""Neural-network building blocks: parameters, modules and layers."""

from sclref.nn import init
from sclref.nn.layers import (
    Conv2d,
    Dropout,
    Flatten,
    GlobalAvgPool2d,
    LeakyReLU,
    Linear,
    MaxPool2d,
    ReLU,
    Sequential,
)
from sclref.nn.module import Module, Parameter
from sclref.nn.norm import BatchNorm1d, BatchNorm2d

__all__ = ["BatchNorm1d", "BatchNorm2d", "Conv2d", "Dropout", "Flatten", "GlobalAvgPool2d", "LeakyReLU", "Linear",
           "MaxPool2d", "Module", "Parameter", "ReLU", "Sequential", "init"]
