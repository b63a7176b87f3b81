"""Sampling and the decode loop."""
