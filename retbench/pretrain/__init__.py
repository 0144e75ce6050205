"""Pretraining: recipes that train local models, and the data hygiene they need."""
