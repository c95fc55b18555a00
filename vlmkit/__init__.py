"""vlmkit: assemble and train vision-language models from pluggable parts."""
__version__ = "0.1.0"

from .config import RunConfig, ModelConfig, load_config  # noqa: E402
from .model import VLM  # noqa: E402

__all__ = ["VLM", "RunConfig", "ModelConfig", "load_config", "__version__"]
