"""The model side: vision encoder -> connector -> causal LLM, assembled into one `VLM` module.

    vlm.py            the module: parts in, image_features, merge, forward, logits, generate, training knobs
    merge.py          the placeholder scatter and its one count check
    build.py          building from a config or a saved folder; the Processor that goes with a model
    serialization.py  the saved folder and the one atomic folder writer
    lora.py           LoRA adapters: add, merge, rebuild from a folder
    distributed.py    sharded parameters (ZeRO-3, FSDP2)
    encoders.py, llm.py, attention.py   the parts

Importing this package registers every part, here and nowhere else: the encoders (encoders.py), the
connectors (the top-level `connectors` package, one file each) and the chat templates (vlmkit.data).
"""
import connectors  # noqa: F401  (each module in it registers its connector)

from .. import data  # noqa: F401  (chat templates register in data/conversation.py)
from . import encoders  # noqa: F401  (encoders register themselves)
from .vlm import VLM


def build_vlm(config, dtype=None) -> VLM:
    """A VLM from a ModelConfig: pretrained parts from hub ids / local dirs, random ones from their configs."""
    return VLM.from_config(config, dtype)


def load_vlm(path, dtype=None, trust_remote_code: bool = False) -> VLM:
    """A VLM from a folder written by `save_pretrained` (or a run folder's model/); the folder's own code
    runs only with `trust_remote_code`."""
    return VLM.from_pretrained(path, dtype, trust_remote_code)


__all__ = ["VLM", "build_vlm", "load_vlm"]
