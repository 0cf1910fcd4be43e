"""Composing a command's config: the Hydra app and its resolvers (app), command-line overrides checked in one line (overrides), checks of a training config (checks)."""
