"""Neural-network building blocks: parameters, modules and layers."""

from sclref.nn import init
from sclref.nn.layers import Conv2d, Dropout, Flatten, LeakyReLU, Linear, MaxPool2d, ReLU, Sequential
from sclref.nn.module import Module, Parameter

__all__ = ["Conv2d", "Dropout", "Flatten", "LeakyReLU", "Linear", "MaxPool2d", "Module", "Parameter",
           "ReLU", "Sequential", "init"]
