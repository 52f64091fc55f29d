"""Hugging Face interop: read a model directory into shardax's model, write one back.

Architectures: llama, mistral, qwen2, qwen3 (-> ``models.Llama``) and gpt2 (-> ``models.GPT``).
Weights come from ``*.safetensors`` files only (with or without an index), read tensor by
tensor, each shard straight onto its device; pickled checkpoints are never opened. Nothing here
touches the network.

    model = models.hf.from_pretrained("path/to/dir")             # one device
    name, config = models.hf.read_config("path/to/dir")           # registry name + dataclass
    params = models.hf.load_params("path/to/dir", name, config, shardings)   # a plan's layout
    models.hf.save_pretrained("out", name, config, get_param)     # and back
"""
from models.hf._config import ARCHITECTURES as ARCHITECTURES
from models.hf._config import SUPPORTED as SUPPORTED
from models.hf._config import HFError as HFError
from models.hf._config import from_options as hf_config
from models.hf._config import read_json as read_json
from models.hf._config import to_options as to_options
from models.hf._load import abstract_params as abstract_params
from models.hf._load import from_pretrained as from_pretrained
from models.hf._load import from_state_dict as from_state_dict
from models.hf._load import load_params as load_params
from models.hf._load import read_config as read_config
from models.hf._safetensors import WeightFiles as WeightFiles
from models.hf._save import check_exportable as check_exportable
from models.hf._save import copy_tokenizer as copy_tokenizer
from models.hf._save import save_pretrained as save_pretrained

__all__ = ["ARCHITECTURES", "SUPPORTED", "HFError", "hf_config", "read_json", "to_options",
           "abstract_params", "from_pretrained", "from_state_dict", "load_params", "read_config",
           "WeightFiles", "check_exportable", "copy_tokenizer", "save_pretrained"]
