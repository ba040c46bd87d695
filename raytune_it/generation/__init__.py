"""Generation with the serving engines: answers for eval and for `raytune-it generate`."""
