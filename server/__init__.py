"""mpserve API: FastAPI replicas that serve balanced perturbed inference and record it in Redis."""
