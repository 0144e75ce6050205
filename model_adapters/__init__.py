"""Model adapter families, one file each; every module registers itself on import.

This folder installs as ``retbench.model_adapters`` (see ``[tool.setuptools.package-dir]`` in pyproject.toml):
import it under that name, never as a top-level ``model_adapters``.
"""
