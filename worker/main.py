"""Command line of the reconciler: ``python -m worker`` (mounted as ``mpserve worker``).

One thread per model, each running :meth:`Reconciler.serve_forever`; SIGTERM or SIGINT stops them
cleanly (each gives its lease back, so a standby worker takes over at once rather than after the TTL).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence

from common.device import DeviceError, use_device
from common.engine_thread import EngineThread
from common.flags import settings_from_argv
from common.logs import configure_logging
from marketplace.models import spec_from_architecture
from marketplace.reconcile import learned_groups
from model_store import ModelStore
from redis_io.connect import connect_when_up, worker_client
from worker.reconciler import Reconciler
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

DESCRIPTION = "mpserve reconciler worker: turns labelled predictions into new model versions"


def build_settings(argv: Sequence[str] | None = None) -> WorkerSettings:
    """Settings from MPSERVE_* variables, overridden by the flags in ``argv``."""
    return settings_from_argv(WorkerSettings, argv, prog="python -m worker", description=DESCRIPTION)


def check_learn_groups(settings: WorkerSettings, store: ModelStore) -> None:
    """Refuse at start a ``learn_groups`` that names a group a stored model lacks (else every reconciliation of
    that model would fail, and it would never learn). A model with no version yet is checked when it has one."""
    for model in settings.models:
        versions = store.versions(model)
        if not versions:
            continue
        spec = spec_from_architecture(store.read_manifest(model, versions[-1])["architecture"])
        try:
            learned_groups(settings.learn_groups, len(spec.groups))
        except ValueError as exc:
            raise ValueError(f"model {model}: {exc}: set MPSERVE_LEARN_GROUPS (--learn-groups) to head, all or "
                             f"indices below {len(spec.groups)}") from None


def run(settings: WorkerSettings, stop: threading.Event, engine_thread: EngineThread | None = None) -> None:
    """Reconcile every configured model until ``stop`` is set (embeddable: no signals, no logging setup).

    The models' threads run their tinygrad work on one ``engine_thread`` (tinygrad is not thread-safe).
    """
    store = ModelStore(settings.store_dir)
    client = connect_when_up(lambda: worker_client(settings.redis_url, settings.poll_ms), stop)
    if client is None:
        return
    own = engine_thread is None
    engine_thread = engine_thread or EngineThread()
    threads = [
        threading.Thread(target=Reconciler(settings, store, client, model, on_device=engine_thread.call).serve_forever,
                         args=(stop,),
                         name=f"reconciler-{model}", daemon=True)
        for model in settings.models
    ]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
        client.close()
        if own:
            engine_thread.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse settings, stop on SIGTERM/SIGINT, run until stopped."""
    settings = build_settings(argv)
    configure_logging(settings.log_level)
    try:
        engine_thread = EngineThread()
        device = engine_thread.call(use_device, settings.device)  # the guard's engines run on it, on that thread
    except DeviceError as exc:
        raise SystemExit(f"mpserve worker: {exc}") from None
    try:
        check_learn_groups(settings, ModelStore(settings.store_dir))
    except ValueError as exc:
        raise SystemExit(f"mpserve worker: {exc}") from None
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        def _on_signal(signum: int, _frame: object) -> None:
            log.info("received %s; stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    log.info("worker %s: models %s, store %s, device %s", settings.consumer, settings.models, settings.store_dir,
             device)
    try:
        run(settings, stop, engine_thread)
    finally:
        engine_thread.shutdown()
    log.info("worker %s stopped", settings.consumer)
    return 0
