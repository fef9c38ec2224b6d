"""mqpredict: find better mixed-precision GGUF quantizations for llama.cpp by learning from measurements."""

__version__ = "0.1.0"
