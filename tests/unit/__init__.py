"""Pure units: no Redis, no child process, no network (see README, Tests)."""
