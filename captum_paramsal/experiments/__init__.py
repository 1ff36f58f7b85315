"""One-command experiments that write the project's measured results into docs/RESULTS.md."""
