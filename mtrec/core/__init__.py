"""The core (the bottom layer): the run's configuration (``TrainConfig``, TOML and saved-config
reading), the one exception type for user mistakes, the consoles, and whole-or-nothing file
writes. Imports nothing of mtrec outside ``mtrec.core``; every other layer may import it."""
