"""Against a real redis-server (conftest.redis_server, redis_proc), in this process: no uvicorn, no worker."""
