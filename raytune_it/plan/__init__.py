"""Sizing: a first-principles memory model of a tuning job per device."""
