"""Puts tests/ on sys.path for the helper modules (builders.py, functional/tunnels.py)."""
