"""Following a registered model's alias on one replica: the version `models:/<name>@<alias>` points
at is the one served, and a move of the alias is picked up without downtime.

`AliasFollower` resolves the alias (`galen.serve.store.resolve`, through
`galen.flows.registry_lookup`), and when it names another version than the one loaded, loads that
version beside the old one with the deployment's own load function, warms it up, then swaps it in
with one assignment: whatever already took the old model finishes on it. A background thread
re-checks every `poll_interval_s` seconds; a failed check keeps the loaded version serving and
records why in `last_error`. `stop()` (the deployment's `__del__`) ends the thread.

Both deployments follow an alias this way: GalenGeneralist (serve/served_generalist.py) the
generalist's, GalenClip (serve/clip_deployment.py) the CLIP model's.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from galen.serve.settings import ServeSettings
from galen.serve.store import ModelRef, resolve, resolve_tracking_uri

log = logging.getLogger("ray.serve.galen")


class Loaded(Protocol):
    """A loaded version: a dataclass with a `ref` field (store.LoadedModel, clip_deployment.Loaded)."""

    ref: ModelRef


M = TypeVar("M", bound=Loaded)


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


class AliasFollower(Generic[M]):
    """The loaded version of `settings.model_name` at `settings.alias`, kept current.

    load(ref, settings, tracking_uri) downloads and loads one version; warm_up(loaded) answers one
    request with it (a version that cannot answer never gets traffic). With `poll_while_empty` the
    thread keeps looking while nothing is loaded (also when poll_interval_s is 0, then every second);
    without it, the first load is the owner's (`follow`, `check_health`) and polling starts after it.
    """

    def __init__(self, settings: ServeSettings, load: Callable[[ModelRef, ServeSettings, str], M],
                 warm_up: Callable[[M], Any], *, thread_name: str, poll_while_empty: bool = False) -> None:
        self.settings = settings  # model_name, alias, tracking_uri, poll_interval_s of the model followed
        self.current: M | None = None
        self.last_error: str | None = None
        self._load, self._warm_up, self._poll_while_empty = load, warm_up, poll_while_empty
        self._uri: str | None = None  # the tracking URI `current` came from
        self._lock = threading.Lock()  # one load at a time (the thread, reconfigure, health checks)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=thread_name, daemon=True)

    # -- checking the alias ----------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Load the version the alias points at now, if it is not the one served; True if switched.
        Raises when the alias cannot be resolved or the version cannot be loaded."""
        with self._lock:
            settings = self.settings
            uri = resolve_tracking_uri(settings)
            ref = resolve(settings, uri)
            cur = self.current
            cur_ref = cur.ref if cur is not None else None
            if cur_ref is not None and uri == self._uri and (cur_ref.name, cur_ref.version) == (ref.name, ref.version):
                if cur_ref.alias != ref.alias:  # another alias naming the same version: no reload
                    self.current = dataclasses.replace(cur, ref=ref)
                return False
            new = self._load(ref, settings, uri)
            self._warm_up(new)
            self.current, self._uri = new, uri  # one assignment: work that took the old model keeps it
            log.info("serving %s version %s (alias %s)%s", ref.name, ref.version, ref.alias,
                     f", was version {cur_ref.version}" if cur_ref else "")
            return True

    def check(self) -> None:
        """One alias check that never raises: its error (or None) goes to `last_error`."""
        try:
            self.refresh()
            self.last_error = None
        except Exception as e:  # noqa: BLE001 - a registry hiccup must not stop serving
            self.last_error = _reason(e)
            if self.current is not None:
                log.warning("alias check of %s failed, still serving version %s: %s", self.settings.model_name,
                            self._version(), self.last_error)

    def follow(self, settings: ServeSettings) -> None:
        """Follow these settings (another alias or model, `reconfigure`) and load at once. Raises when
        nothing is loaded yet and the load fails; otherwise a failure keeps the loaded version serving
        and is recorded in `last_error`."""
        self.settings = settings
        try:
            self.refresh()
            self.last_error = None
        except Exception as e:  # noqa: BLE001 - keep serving the loaded version; health shows why
            if self.current is None:
                raise
            self.last_error = _reason(e)
            log.error("reconfigure kept %s version %s: %s", settings.model_name, self._version(), self.last_error)

    def check_health(self) -> None:
        """Raise unless a version is loaded (loading one now if none is) and the thread is running."""
        if self.current is None:
            self.refresh()
        if self.current is None:
            raise RuntimeError("no model loaded")
        if not self._thread.is_alive():
            raise RuntimeError("the alias watcher thread died")

    def _version(self) -> str | None:
        cur = self.current
        return cur.ref.version if cur is not None else None

    # -- the thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the polling thread (at once, or when the check it is running ends; a daemon, it never holds
        the process)."""
        self._stop.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _watch(self) -> None:
        while not self._stop.is_set():
            interval = self.settings.poll_interval_s
            if self._stop.wait(interval if interval > 0 else 1.0):
                break
            if self.current is None and not self._poll_while_empty:
                continue  # the owner loads the first version
            if self.current is not None and interval <= 0:
                continue  # polling switched off: only reconfigure switches
            self.check()
