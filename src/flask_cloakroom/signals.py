"""Blinker signals for session events (Flask's own signal library).

Every event is sent on :data:`session_event`, and also on the signal of its
kind.  The sender is the Flask app; the event is the ``event`` keyword
argument, a :class:`flask_cloakroom.activity.Event`::

    from flask_cloakroom import signals

    @signals.anomaly_detected.connect_via(app)
    def tell_the_user(app, event, **extra):
        send_mail(event.user_id, f"Unusual sign-in: {event.details['rule']}")

Receivers run inside the request that caused the event; an exception in a
receiver is logged and does not break the request.
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

#: Every event, whatever its kind.
session_event = _signals.signal("cloakroom-session-event")
#: A new session was stored for the first time.
session_created = _signals.signal("cloakroom-session-created")
#: ``login()`` bound a session to a user.
session_login = _signals.signal("cloakroom-session-login")
#: A session got a new id (login, ``rotate()``, a rule).
session_rotated = _signals.signal("cloakroom-session-rotated")
#: ``logout()`` (or ``session.clear()``) ended a session.
session_logout = _signals.signal("cloakroom-session-logout")
#: A session was found dead of its idle or absolute timeout.
session_expired = _signals.signal("cloakroom-session-expired")
#: A session was revoked (``event.details`` says by whom and why).
session_revoked = _signals.signal("cloakroom-session-revoked")
#: A session was ended to respect ``CLOAKROOM_MAX_SESSIONS_PER_USER``.
session_evicted = _signals.signal("cloakroom-session-evicted")
#: A rule found something unusual (``event.details["rule"]``).
anomaly_detected = _signals.signal("cloakroom-anomaly-detected")
#: A user's credentials changed; their other sessions end.
credentials_changed = _signals.signal("cloakroom-credentials-changed")
#: A Flask cookie session or a Flask-Session session was adopted.
session_adopted = _signals.signal("cloakroom-session-adopted")

BY_KIND = {
    "created": session_created,
    "login": session_login,
    "rotated": session_rotated,
    "logout": session_logout,
    "expired_idle": session_expired,
    "expired_absolute": session_expired,
    "revoked": session_revoked,
    "evicted": session_evicted,
    "anomaly": anomaly_detected,
    "credential_changed": credentials_changed,
    "adopted": session_adopted,
}
