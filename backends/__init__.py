"""Hand-written kernels for kiln's ops on particular hardware, chosen when the graph is lowered."""
