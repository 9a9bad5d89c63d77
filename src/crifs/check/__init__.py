"""Pure engines that turn listings and store records into findings and verdicts."""
