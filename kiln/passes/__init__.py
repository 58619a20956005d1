"""Compiler passes, one per file (``<verb>_<object>.py``); ``pipeline.py`` runs them in order."""
