"""The one package that talks to Redis (docs/DESIGN.md §2): no other module imports redis-py or issues a command.

- ``keys``: every key name of a model;
- ``protocol``: the types that cross the boundary, their encoding, command builders and reply parsers (pure);
- ``lua_scripts`` and ``lua/*.lua``: the atomic steps (attach a label, publish, roll back, the lease);
- ``recordlog``: one model's records, stream, versions and lease, sync (worker) and async (API);
- ``fenced``: the leader's acknowledgement of dropped entries without a publish;
- ``admin_queue``: ``POST /admin/reconcile`` requests for the leading worker, and its answers;
- ``events``: the replicas' subscription to version events;
- ``connect``: the clients of each process, and what "Redis is down" means.

Layering (``tests/unit/test_architecture.py``): ``redis_io`` imports ``common``, ``model_store`` (through the
name rules) and ``marketplace`` (the loss of a label), never ``server``, ``worker`` or ``mpserve``.
"""
