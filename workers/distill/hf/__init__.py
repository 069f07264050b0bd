"""Transformers support for the engine: teachers, students, text data and the HF task adapters."""
