"""vitscale launch package."""
