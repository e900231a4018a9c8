"""fqvit-det: post-training quantization of vision transformers (FQ-ViT, PTQ4ViT, RepQ-ViT, AdaLog)."""
__version__ = '0.1.0'
