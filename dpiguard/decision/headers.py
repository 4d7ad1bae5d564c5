"""Request headers that change where or how the DPI routes a request: only clean requests leave.

Some servers and frameworks take the path, the method or the host from a header instead of the request
line. A client could then have dpiguard decide on ``GET /patients/P0001`` while the DPI serves
``X-Original-URL: /patients/P0002``. dpiguard refuses those headers (reason ``routing_header``), in any
case and with ``_`` for ``-``, and strips the forwarding headers a client has no business sending (the
DPI would build its links or route on them). Sources:

* ``X-Original-URL``, ``X-Rewrite-URL``: IIS URL Rewrite module and ASP.NET; Symfony's ``Request``
  honoured them (CVE-2018-14773), Zend Framework / Laminas too (ZF2018-01);
* ``X-Override-URL``, ``X-Original-URI``, ``X-Forwarded-URI``, ``X-Forwarded-Path``,
  ``X-Envoy-Original-Path``: reverse proxies and auth gateways (nginx ``auth_request`` setups, Traefik
  ``X-Forwarded-Uri``, Envoy) pass the original path in them and applications read it back;
* ``X-HTTP-Method-Override``, ``X-HTTP-Method``, ``X-Method-Override``, ``X-Original-Method``: method
  override (Google APIs, OData/Microsoft, Express ``method-override``, Symfony, Spring
  ``HiddenHttpMethodFilter`` variants);
* stripped: ``Forwarded`` (RFC 7239), ``X-Forwarded-Host``, ``X-Forwarded-Server``, ``X-Forwarded-Port``,
  ``X-Forwarded-Proto``, ``X-Forwarded-Prefix``, ``X-Forwarded-Scheme``, ``X-Original-Host``, ``X-Host``,
  ``X-HTTP-Host-Override``, ``Front-End-Https``: Werkzeug ``ProxyFix``, Django ``USE_X_FORWARDED_HOST``,
  Spring ``ForwardedHeaderFilter``, ASP.NET ``ForwardedHeaders`` and Rails build absolute URLs or route on them.
"""

from __future__ import annotations

ROUTING_HEADERS = frozenset({
    "x-original-url", "x-rewrite-url", "x-override-url", "x-original-uri", "x-forwarded-uri",
    "x-forwarded-path", "x-envoy-original-path", "x-http-method-override", "x-http-method",
    "x-method-override", "x-original-method",
})
FORWARDING_HEADERS = frozenset({
    "forwarded", "x-forwarded-host", "x-forwarded-server", "x-forwarded-port", "x-forwarded-proto",
    "x-forwarded-prefix", "x-forwarded-scheme", "x-original-host", "x-host", "x-http-host-override",
    "front-end-https",
})
