"""shardax models (Flax NNX) and the registry that maps ``model.name`` to them.

Models name logical axes on their params (``nnx.with_partitioning`` metadata, key
``out_sharding``) and know nothing about meshes or ``parallel``. ``models.hf`` reads and writes
Hugging Face model directories.
"""
from models import gpt as gpt
from models import llama as llama
from models import mlp as mlp
from models import moe as moe
from models import wide_resnet as wide_resnet
from models import hf as hf  # after the models it reads are registered
from models._registry import ModelSpec as ModelSpec
from models._registry import available_models as available_models
from models._registry import create_model as create_model
from models._registry import get_spec as get_spec
from models._registry import make_config as make_config
from models._registry import register as register
from models.gpt import GPT as GPT
from models.gpt import GPTConfig as GPTConfig
from models.llama import Llama as Llama
from models.llama import LlamaConfig as LlamaConfig
from models.mlp import MLP as MLP
from models.mlp import MLPConfig as MLPConfig
from models.moe import MoEConfig as MoEConfig
from models.wide_resnet import WideResNet as WideResNet
from models.wide_resnet import WideResNetConfig as WideResNetConfig
