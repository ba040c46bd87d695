"""Measuring the survey's three effects of instruction tuning on held-out task families."""
