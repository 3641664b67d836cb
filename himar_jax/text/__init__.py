"""Text conditioning for text-to-image Hi-MAR: CLIP's BPE tokenizer (tokenizer.py), CLIP's text Transformer with
Hugging Face weight import (clip.py), and sampling from prompt files (sampling.py)."""
