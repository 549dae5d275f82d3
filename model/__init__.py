"""A hand-written LLaVA-NeXT: loads and saves Hugging Face checkpoints, equals transformers' outputs."""

from model.config import LlavaNextConfig, TextConfig, VisionConfig
from model.llava_next import LlavaNext
from model.processor import SYSTEM_PROMPT, ImageProcessor, Processor, load_image

__all__ = ["LlavaNext", "LlavaNextConfig", "TextConfig", "VisionConfig", "Processor", "ImageProcessor",
           "SYSTEM_PROMPT", "load_image"]
