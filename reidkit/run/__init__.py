"""Run bookkeeping that every other part stands on (imports nothing else of reidkit).

- errors: UserError, the one-paragraph error a user can act on
- settings: config.py's values resolved once (overrides, checks of names and types), the
  classes of settings and the rule telling a dataset name from a folder or CSV path
- cli: the command line (modes, --KEY=VALUE) and --help
- settings_page: docs/settings.md, generated from config.py and settings (python -m
  reidkit.run.settings_page)
- atomic: write beside, then rename: every file is whole or absent; the full-disk message;
  the file lock that keeps work from running twice at once
- folders: run folders, settings.json, finding and resolving checkpoints (to evaluate, to
  resume)
- log: log.txt, everything a command prints, written as it goes
- checkpoints: safe loading, saving and resuming of checkpoints
- device: the device chosen at run time, a busy-CPU hint
- distributed: the processes of a DDP run (rank, world size, on_main, same_everywhere,
  each process's seed)
"""
