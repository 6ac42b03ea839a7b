"""The dock widgets: Model, Segment, Fine-tune, Embedding."""

from napari_coral._widgets.embedding import EmbeddingWidget
from napari_coral._widgets.finetune import FinetuneWidget
from napari_coral._widgets.model import ModelWidget
from napari_coral._widgets.segment import SegmentWidget

__all__ = ["ModelWidget", "SegmentWidget", "FinetuneWidget", "EmbeddingWidget"]
