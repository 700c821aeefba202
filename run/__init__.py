"""The run lifecycle."""
