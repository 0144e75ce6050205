"""Model adapter families, one file each; every module registers itself on import."""
