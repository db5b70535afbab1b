"""The tools that measure, check, export and plot smoltrain: each imports the core (the top-level files) and none
of the core imports them. Run each from the repository's root as a module, e.g. `python -m tools.bench`."""
