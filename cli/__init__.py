"""The command line: the parser of every family's flags and YAML configs (the edge where settings enter)."""
