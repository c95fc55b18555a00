"""vlmkit: assemble and train vision-language models from pluggable parts."""
from .version import __version__
from .config import RunConfig, ModelConfig, load_config  # noqa: E402
from .models import VLM, build_vlm, load_vlm  # noqa: E402

__all__ = ["VLM", "build_vlm", "load_vlm", "RunConfig", "ModelConfig", "load_config", "__version__"]
