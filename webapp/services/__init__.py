"""Business logic. Routes, tasks and CLIs all call these functions; only services commit."""
