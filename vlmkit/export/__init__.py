"""Export to transformers-native models (and import them back): see vlmkit/export/common.py."""
from .common import *  # noqa: F401,F403  (being split into common / llava / internvl)
from .common import EXPORT_TYPES, export_model, import_model  # noqa: F401
