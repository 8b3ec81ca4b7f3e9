"""Simulation harness: synthetic sites, site splits, experiment runners and presets."""
