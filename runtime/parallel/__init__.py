"""Expert parallelism: process groups, expert placement, all-to-all dispatch and combine, EP groups."""
