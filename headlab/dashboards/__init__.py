"""The Dash head browser: reads a Store and analyses results; never imports probe/ or kernels/."""
