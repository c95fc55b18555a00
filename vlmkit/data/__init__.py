"""The data side: conversation formatting and label masking, images, datasets, collation (the demo data lives in
vlmkit.experiments)."""
from .conversation import IGNORE, SampleError, encode, normalize, truncate
from .dataset import ConversationDataset, load_records
from .images import ImageTransform, load_image
from .processor import Processor, collate, collate_packed

__all__ = ["IGNORE", "SampleError", "encode", "normalize", "truncate", "ConversationDataset", "load_records",
           "ImageTransform", "load_image", "Processor", "collate", "collate_packed"]
