"""lumorik-sft: supervised fine-tuning of causal language models, taught and implemented."""

__version__ = "0.3.0"
