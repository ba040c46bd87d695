"""Ray Tune sweeps over config paths: search space, the sweep driver, results."""
