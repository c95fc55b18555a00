"""Deprecated: the VLM moved to `vlmkit.models` (vlm.py, build.py, serialization.py, lora.py, merge.py,
distributed.py) and ImageTokenCounter to `vlmkit.tiling.counter`; these names stay here for one release."""
from .models.build import build_processor, load_processor, make_processor, resolve_model_dir  # noqa: F401
from .models.distributed import is_dtensor as _is_dtensor, param_id as _param_id, whole as _whole  # noqa: F401
from .models.serialization import CONFIG_NAME, WEIGHTS_NAME, fsync_dir  # noqa: F401
from .models.vlm import VLM  # noqa: F401
from .tiling.counter import ImageTokenCounter  # noqa: F401
