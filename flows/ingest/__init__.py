"""Readers of real dataset layouts (one module per format)."""
