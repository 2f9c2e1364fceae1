"""The demo world: synthetic scenes, concepts and the script that trains small SDXL-family weights on them."""
