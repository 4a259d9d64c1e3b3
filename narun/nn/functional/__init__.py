"""Neural-network ops with fused forward and backward, named as in torch.nn.functional.

    >>> from narun.nn import functional as F
    >>> loss = F.cross_entropy(logits, targets)          # fused log_softmax + NLL
    >>> y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> h = F.gelu(F.linear(x, w, b), approximate="tanh")

The elementwise activations and `linear` live with the tensor ops and are re-exported here.
"""

from narun.nn.functional._attention import scaled_dot_product_attention
from narun.nn.functional._batchnorm import batch_norm
from narun.nn.functional._conv import avg_pool2d, conv2d, max_pool2d
from narun.nn.functional._dropout import dropout
from narun.nn.functional._embedding import embedding
from narun.nn.functional._loss import cross_entropy, mse_loss, nll_loss
from narun.nn.functional._norm import layer_norm, rms_norm
from narun.nn.functional._rope import apply_rotary_emb, rotary_cos_sin
from narun.nn.functional._softmax import log_softmax, softmax
from narun.tensor import gelu, linear, relu, sigmoid, silu, tanh

__all__ = [
    "apply_rotary_emb", "avg_pool2d", "batch_norm", "conv2d", "cross_entropy", "dropout",
    "embedding", "gelu", "layer_norm", "linear", "log_softmax", "max_pool2d", "mse_loss",
    "nll_loss", "relu", "rms_norm", "rotary_cos_sin", "scaled_dot_product_attention",
    "sigmoid", "silu", "softmax", "tanh",
]
