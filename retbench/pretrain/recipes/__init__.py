"""Pretraining recipes, one file each (registered lazily in retbench.pretrain.recipe.RECIPES)."""
