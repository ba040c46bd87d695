"""`raytune-it run` and `raytune-it report`: the whole service in one command, and its report."""
