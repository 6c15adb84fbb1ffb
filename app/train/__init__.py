"""Training and evaluation of tokserve's native tokenizers (FSQ image, RVQ audio)."""
