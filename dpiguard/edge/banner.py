"""What dpiguard adds to the DPI's answers on their way back: no caching, and the session bar.

* **No cache**: every forwarded answer to an authenticated request (anything but the public routes)
  gets ``Cache-Control: no-store`` and ``Pragma: no-cache``, replacing the DPI's own: after a logout on
  a shared workstation, Back must not show the previous patient's record from the browser's cache
  (the page is asked again, so the request is refused and traced).
* **The session bar** (``ui.banner``): HTML pages of the DPI (``GET``, ``Content-Type: text/html``, a
  document navigation, a ``<body>`` tag) get a small bar right after ``<body…>`` (``ui.banner_position:
  top``) or before ``</body>`` (``bottom``): who is logged in, *change user*, *log out*, the idle
  expiry warning and an emergency access in progress (``templates/banner.html``). It is links and text
  only: no script and no inline style, so the DPI's Content-Security-Policy need not change (its style
  sheet is ``/_dpiguard/static/banner.css``, same origin: ``style-src 'self'`` allows it; a policy that
  forbids even that leaves the bar unstyled, still usable). Its text is ASCII with character
  references, so it reads right whatever the page's charset.

JSON, FHIR and every other non-HTML answer are never buffered or re-encoded for this: only two
headers are set on them. For an HTML page the cost is one search for the ``<body>`` tag in the first
64 KiB, and a template rendering once per person and minute (the bar only changes with the minute of
the idle expiry it shows, the language and an emergency access).
"""

from __future__ import annotations

import logging
import re
import time
from datetime import datetime

from mitmproxy import http

from dpiguard.edge.pages import Pages
from dpiguard.i18n import Localizer

log = logging.getLogger("dpiguard")

PRIVATE_KEY = "dpiguard_private"  # flow metadata: the verdict of a forwarded authenticated request
INJECT_KEY = "dpiguard_banner"  # flow metadata: this answer gets the bar
COOKIES_KEY = "dpiguard_set_cookies"  # flow metadata: Set-Cookie headers for the answer (edge/resume.py)

_BODY_OPEN = re.compile(rb"<body\b[^>]*>", re.IGNORECASE)
_BODY_CLOSE = re.compile(rb"</body\s*>", re.IGNORECASE)
SEARCH_BYTES = 65536
BAR_CACHE_ENTRIES = 4096  # rendered bars kept (one per person, language and minute)


class Banner:
    def __init__(self, pages: Pages, *, enabled: bool, position: str, idle_timeout: int, idle_warning: int = 120):
        self.pages = pages
        self.idle_warning = idle_warning  # 0: no idle warning in the bar
        self.enabled = enabled
        self.position = position
        self.idle_timeout = idle_timeout
        self._bars: dict[tuple, bytes] = {}  # rendered bars (see bar())

    # -- hooks (called by the addon) ---------------------------------------------------------------
    @staticmethod
    def note(flow: http.HTTPFlow, verdict) -> None:
        """After forwarding: remember that this answer carries an authenticated user's data."""
        if not verdict.public:
            flow.metadata[PRIVATE_KEY] = verdict

    def on_headers(self, flow: http.HTTPFlow) -> None:
        """``responseheaders``: no-store on private answers; decide whether this one gets the bar."""
        response = flow.response
        if response is None:
            return
        for header in flow.metadata.get(COOKIES_KEY, ()):
            response.headers.add("Set-Cookie", header)
        verdict = flow.metadata.get(PRIVATE_KEY)
        if verdict is None:
            return
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
        if (self.enabled and verdict.session is not None and verdict.fhir_context is None and not verdict.fhir
                and flow.request.method == "GET"
                and response.headers.get("content-type", "").lower().startswith("text/html")
                and flow.request.headers.get("sec-fetch-dest", "document") == "document"
                and 200 <= response.status_code < 300):
            flow.metadata[INJECT_KEY] = True
            response.stream = False  # the bar goes into the body: buffer this (HTML) answer

    def on_response(self, flow: http.HTTPFlow) -> None:
        """``response``: put the bar into an HTML page. Any problem leaves the page as it was."""
        if not flow.metadata.get(INJECT_KEY) or flow.response is None:
            return
        try:
            self._inject(flow)
        except Exception as exc:  # the page still goes out; the bar is a convenience, never a gate
            log.warning("dpiguard: session bar not added: %s", exc)

    # -- the bar -----------------------------------------------------------------------------------
    def bar(self, flow: http.HTTPFlow, verdict, now: float) -> bytes:
        """The bar for this page. The same person's pages within one minute get the same bar (the idle
        expiry is shown to the minute), so it is rendered once per person, language and local minute
        and then reused (``_bars``, bounded)."""
        l10n: Localizer = self.pages.localizer(flow.request.headers)
        grant = verdict.break_glass
        user = verdict.session.user
        minute = None
        if self.idle_warning:
            local = datetime.fromtimestamp(now + self.idle_timeout, l10n.tz)
            minute = (local.year, local.month, local.day, local.hour, local.minute)
        key = (l10n.lang, l10n.tz_name, user, minute, None if grant is None else (grant.id, grant.end))
        cached = self._bars.get(key)
        if cached is not None:
            return cached
        html = self.pages.render_text(
            "banner.html", l10n, position=self.position, user=user,
            expires=l10n.clock(now + self.idle_timeout) if self.idle_warning else "", grant=grant,
            until=l10n.clock(grant.end) if grant is not None else "")
        data = html.encode("ascii", "xmlcharrefreplace")
        if len(self._bars) >= BAR_CACHE_ENTRIES:
            self._bars.clear()  # at most a rendering per person and minute again
        self._bars[key] = data
        return data

    def _inject(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        data = response.content if response.headers.get("content-encoding") else response.raw_content
        if not data:
            return
        if self.position == "bottom":
            match = None
            for match in _BODY_CLOSE.finditer(data, max(0, len(data) - SEARCH_BYTES)):
                pass
            if match is None:
                return
            at = match.start()
        else:
            match = _BODY_OPEN.search(data, 0, SEARCH_BYTES)
            if match is None:
                return  # a fragment, not a page
            at = match.end()
        bar = self.bar(flow, flow.metadata[PRIVATE_KEY], time.time())
        response.content = data[:at] + bar + data[at:]
