"""Models: MLP, the GPT family, BERT, ResNet, ViT and CLIP, and a registry so configs can
name them."""

from narun.models._registry import build_from_config, build_model, model_names, register_model
from narun.models._trained import Trained, load_trained
from narun.models.bert import BERT
from narun.models.clip import CLIP
from narun.models.gpt import GPT, PRESETS, GPTConfig, KVCache, gpt_config
from narun.models.mlp import MLP
from narun.models.resnet import ResNet
from narun.models.vit import ViT

__all__ = ["BERT", "CLIP", "GPT", "MLP", "PRESETS", "GPTConfig", "KVCache", "ResNet", "Trained",
           "ViT", "build_from_config", "build_model", "gpt_config", "load_trained",
           "model_names", "register_model"]
