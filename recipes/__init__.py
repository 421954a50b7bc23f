"""Training recipes shipped with aanas (YAML files; see aanas.config.load_recipe)."""
