"""What the API and the worker share that is neither Redis (``redis_io``) nor the files of the store
(``model_store``): loading a stored version into what the engine needs, the name rules, settings types and
their command-line flags, logging, fault points, per-version metrics, and the shipped default model.

Layering (``tests/unit/test_architecture.py``): ``common`` imports ``marketplace`` and ``model_store`` only.
"""
