"""LightningModules: how a model is trained, independent of which architecture it is."""
