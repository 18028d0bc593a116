"""Real processes: uvicorn replicas, workers, `mpserve up`, scripts and compilers run as children."""
