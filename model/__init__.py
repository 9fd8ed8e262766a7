"""Galen's networks, tokenizer, losses and decoding. Imports neither `flows` nor `serve`."""
