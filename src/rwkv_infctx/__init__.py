"""rwkv-infctx: train RWKV language models on sequences of any length, exactly, in constant memory."""

__version__ = "0.1.0"
