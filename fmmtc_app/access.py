"""The password gate: the sign-in page (``app.py`` shows nothing else until it is passed),
throttling of wrong passwords, and every attempt in the audit log.

Set ``FMMTC_PASSWORD`` to turn the gate on (see :mod:`fmmtc_app`).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections.abc import Iterable

import streamlit as st

from fmmtc_app.session import NOT_SIGNED_IN, engine, rerun, setting
from fmmtc_core._errors import FMMTCError

__all__ = ["access_granted", "require_access", "sign_in_page", "client_address",
           "gate_off_notice", "FREE_ATTEMPTS", "MAX_DELAY_S", "LOCK_AFTER", "LOCK_S",
           "WINDOW_S"]

#: Sign-in throttling: after FREE_ATTEMPTS wrong passwords (per browser session and per client
#: address, within WINDOW_S), each further attempt waits 2, 4, 8 ... (at most MAX_DELAY_S)
#: seconds after the last one; LOCK_AFTER wrong passwords lock that client out for LOCK_S.
FREE_ATTEMPTS, MAX_DELAY_S, LOCK_AFTER, LOCK_S, WINDOW_S = 3, 60.0, 10, 900.0, 900.0


class _Throttle:
    """Failed sign-ins per key (client address, browser session), shared by all sessions of the
    server process (``st.cache_resource``), thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(key, []) if now - t < WINDOW_S]
        self._failures[key] = times
        return times

    def wait_s(self, keys: Iterable[str], now: float) -> float:
        """Seconds before the next attempt is allowed (0 when allowed now)."""
        wait = 0.0
        with self._lock:
            for key in keys:
                times = self._recent(key, now)
                n = len(times)
                if n >= LOCK_AFTER:
                    wait = max(wait, times[-1] + LOCK_S - now)
                elif n >= FREE_ATTEMPTS:
                    delay = min(2.0 ** (n - FREE_ATTEMPTS + 1), MAX_DELAY_S)
                    wait = max(wait, times[-1] + delay - now)
        return max(0.0, wait)

    def fail(self, keys: Iterable[str], now: float) -> None:
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)

    def clear(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._failures.pop(key, None)


@st.cache_resource(show_spinner=False)
def _throttle() -> _Throttle:
    return _Throttle()


def client_address() -> str:
    """The browser's address as the server sees it (one key of the sign-in throttling).

    Returns
    -------
    str
        The client's IP address; ``"unknown"`` when Streamlit cannot tell (e.g. in tests or
        behind some proxies).
    """
    try:
        address = st.context.ip_address
    except Exception:  # noqa: BLE001 - older Streamlit or no request context
        return "unknown"
    return address if isinstance(address, str) and address else "unknown"


def _audit_sign_in(action: str, name: str, client: str) -> None:
    """Record a sign-in (or a failed one) in the audit log; the log must never stop a sign-in."""
    from fmmtc_core.store import session_scope
    from fmmtc_core.store.repository import audit

    try:
        with session_scope(engine(), write=True) as s:
            audit(s, name if action == "sign-in" else NOT_SIGNED_IN, action, "session", None,
                  {"name": name[:64], "client": client})
    except Exception as exc:  # noqa: BLE001 - a database problem shows on the pages themselves
        logging.getLogger(__name__).warning("could not audit a %s: %s", action, exc)


def access_granted() -> bool:
    """Whether this browser session may see the pages.

    Returns
    -------
    bool
        True when no password is configured (``FMMTC_PASSWORD``) or this browser session has
        signed in.
    """
    return not setting("FMMTC_PASSWORD") or bool(st.session_state.get("authenticated"))


_LOOPBACK = ("127.", "::1", "localhost")


def gate_off_notice() -> str | None:
    """What the landing page says when the password gate is off.

    Returns
    -------
    str or None
        None when ``FMMTC_PASSWORD`` is set; else a Markdown sentence saying that nobody is
        asked for a password, on which address the server listens (``server.address``: this
        computer only for a loopback address, the network otherwise) and how to turn the gate
        on.
    """
    if setting("FMMTC_PASSWORD"):
        return None
    address = str(st.get_option("server.address") or "")
    if address.startswith(_LOOPBACK):
        reach = (f"The server listens on {address} only, so only this computer can open it.")
    else:
        shown = address or "every network interface"
        reach = (f"**The server listens on {shown}: anyone who can reach this computer over "
                 "the network can open it.**")
    return ("**The password gate is off**: nobody is asked for a name or password. "
            f"{reach} Set `FMMTC_PASSWORD` (environment or `.streamlit/secrets.toml`) and "
            "restart to turn it on.")


def require_access() -> None:
    """Stop the page unless :func:`access_granted` (pages keep this as a second line: the
    frame in ``app.py`` already shows only the sign-in page until then)."""
    if not access_granted():
        st.stop()


def sign_in_page() -> None:
    """The only page a visitor sees until signed in (see ``app.py``): name + password, with
    throttling of wrong passwords and every attempt in the audit log."""
    from fmmtc_core.store.repository import validate_label

    password = setting("FMMTC_PASSWORD") or ""
    st.title("FMM-TC Screen")
    st.write("This dashboard is protected. Enter your name (for the audit log) and the team "
             "password.")
    with st.form("login"):
        name = st.text_input("Your name or initials")
        given = st.text_input("Password", type="password")
        ok = st.form_submit_button("Sign in", type="primary")
    if not ok:
        return
    client = client_address()
    if "session_key" not in st.session_state:
        st.session_state["session_key"] = secrets.token_hex(8)
    keys = (f"client:{client}", f"session:{st.session_state['session_key']}")
    throttle = _throttle()
    now = time.monotonic()
    wait = throttle.wait_s(keys, now)
    if wait > 0:
        st.error(f"Too many wrong passwords. Try again in {int(wait) + 1} seconds.")
        return
    try:
        name = validate_label("name", name) or ""
    except FMMTCError as exc:
        st.error(str(exc))
        return
    if not name:
        st.error("Enter your name or initials: every screening records who ran it.")
    elif hmac.compare_digest(given.encode(), password.encode()):
        throttle.clear(keys)
        _audit_sign_in("sign-in", name, client)
        st.session_state["authenticated"] = True
        st.session_state["operator"] = name
        rerun()
    else:
        throttle.fail(keys, now)
        _audit_sign_in("sign-in failed", name, client)
        st.error("That password is not correct. Ask your study coordinator for it.")
