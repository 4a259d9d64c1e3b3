"""The processes the coordinator runs: parameter servers, trainers, pipeline stages, executors."""
