"""Search spaces shipped with aanas (YAML files; see aanas.space.SearchSpace.from_yaml)."""
