"""vitscale data_prep package."""
