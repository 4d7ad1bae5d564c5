"""The benchmark upstream: a small, fast HTTP/1.1 keep-alive server with canned DPI-like answers.

Every configuration (a: direct, b: mitmproxy alone, c: dpiguard) talks to this same process, so the
upstream's cost is identical in all three. It answers any path, by family: an HTML page (~6 kB) for
web pages, a JSON document (~1.5 kB) under ``/api/``, a FHIR Bundle (~3.5 kB) under ``/fhir/``. It
does not verify dpiguard's assertion (the demo DPI does; here the upstream must stay cheap so that
the proxies are what is measured).

Run: ``python -m benchmarks.upstream --port 9000`` (prints ``ready PORT`` once listening).
"""

from __future__ import annotations

import argparse
import asyncio

import orjson


def _bodies() -> dict[str, tuple[bytes, bytes]]:
    rows = "".join(
        f"<tr><td>2026-01-{d:02d} 08:00</td><td>Hémoglobine</td><td>{11 + d % 5}.{d % 10} g/dL</td>"
        f"<td>12.0–17.0</td><td>normal</td></tr>\n" for d in range(1, 29))
    html = ("<!doctype html><html lang=fr><head><meta charset=utf-8><title>Dossier patient</title>"
            "<link rel=stylesheet href=/static/app.css></head><body><header><nav><a href=/>Accueil</a> "
            "<a href=/patients>Patients</a></nav></header><main><h1>Biologie</h1><table>\n"
            + rows + "</table></main><footer>DPI de démonstration</footer></body></html>").encode()
    results = [{"code": "718-7", "label": "Hémoglobine", "value": 13.1 + i / 10, "unit": "g/dL",
                "time": 1767225600 + 3600 * i, "low": 12.0, "high": 17.0} for i in range(8)]
    api = orjson.dumps({"patient": "P000001", "category": "biology", "results": results})
    entries = [{"fullUrl": f"urn:uuid:obs-{i}", "resource": {
        "resourceType": "Observation", "id": f"obs-{i}", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7", "display": "Hémoglobine"}]},
        "subject": {"reference": "Patient/P000001"}, "effectiveDateTime": "2026-01-01T08:00:00Z",
        "valueQuantity": {"value": 13.1, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"},
    }} for i in range(8)]
    fhir = orjson.dumps({"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries})
    return {"html": (b"text/html; charset=utf-8", html), "api": (b"application/json", api),
            "fhir": (b"application/fhir+json", fhir)}


BODIES = _bodies()


def _response(kind: str) -> bytes:
    ctype, body = BODIES[kind]
    return (b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\nCache-Control: no-store\r\n\r\n" + body)


RESPONSES = {kind: _response(kind) for kind in BODIES}


class _Http(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                line_end = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17:line_end if line_end >= 0 else None].strip() or 0)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            first = head.split(b"\r\n", 1)[0].split(b" ")
            path = first[1] if len(first) > 1 else b"/"
            kind = "fhir" if path.startswith(b"/fhir") else "api" if path.startswith(b"/api/") else "html"
            self.transport.write(RESPONSES[kind])


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Http, host, port, backlog=1024)
    print(f"ready {port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
