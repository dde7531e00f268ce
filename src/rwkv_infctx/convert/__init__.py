"""Conversions between RWKV-LM model files and other ecosystems."""
