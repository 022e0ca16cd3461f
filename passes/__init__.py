"""PassConfig, its resolution per optimization level, and the Inductor passes that implement each fusion."""
