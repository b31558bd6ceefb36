"""Command-line entry points of the adapters package (see bin/)."""
