"""`bin/precompute`: converts a checkpoint into the packed expert store, and checks, sizes or removes one.

Modules: `cli` (argument parsing, exit codes), `build` (plan, resume, run, write store.json),
`convert` (source expert -> store bytes), `pool` + `worker` + `messages` (worker processes),
`progress` (the progress bar), `manage` (validate, stats, clean).
"""
