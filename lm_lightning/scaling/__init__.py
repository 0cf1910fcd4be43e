"""Scaling laws: power-law, Chinchilla (approach 3) and IsoFLOP (approach 2) fits with bootstrap intervals; plots."""
