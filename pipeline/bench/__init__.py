"""`prefetch-bench`: the benchmark and simulation commands (one module per subcommand)."""
