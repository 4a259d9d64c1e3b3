"""Neural-network building blocks: Module, Parameter, layers, init, and functional ops.

Names and semantics follow torch.nn, so a model written for one reads the same in the other
and their state dicts share names.
"""

from narun.nn import functional, init, utils
from narun.nn._activation import GELU, Dropout, ReLU, Sigmoid, SiLU, Tanh
from narun.nn._batchnorm import BatchNorm2d
from narun.nn._containers import ModuleDict, ModuleList, Sequential
from narun.nn._conv import Conv2d
from narun.nn._linear import Embedding, Identity, Linear
from narun.nn._module import IncompatibleKeys, Module, Parameter
from narun.nn._norm import LayerNorm, RMSNorm

__all__ = [
    "GELU", "BatchNorm2d", "Conv2d", "Dropout", "Embedding", "Identity", "IncompatibleKeys",
    "LayerNorm", "Linear", "Module", "ModuleDict", "ModuleList", "Parameter", "RMSNorm", "ReLU",
    "Sequential", "SiLU", "Sigmoid", "Tanh", "functional", "init", "utils",
]
