"""Demo DPI: the patient-record web application dpiguard protects in the demo.

It is an example upstream, not a product. What it demonstrates is the trust model:
the application performs no login of its own and believes only the identity dpiguard
signed. Every request (except the public stylesheet and favicon) must carry a valid
``X-DPIGuard-Assertion`` whose subject equals ``X-DPIGuard-User``; anything else gets
401 "request did not come through dpiguard".

Three faces over the same in-memory records:

* HTML pages   ``/``, ``/patients``, ``/patients/<pid>[/notes|/biology|/prescriptions|/imaging]``
* JSON API     ``/api/patients/<pid>[/notes|/biology|/prescriptions|/imaging]``
* FHIR R4      ``/fhir/...``: read, search, history, writes, transactions (``fhir_server.py``)

Care-team authorization is dpiguard's job: the application only uses the verified units
to choose which patients to list on ``/patients``.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from flask import Flask, Response, g, redirect, render_template, request, url_for
from jinja2 import DictLoader
from werkzeug.serving import BaseWSGIServer, make_server

from dpiguard.decision.assertion import (
    HEADER_ASSERTION,
    HEADER_BREAK_GLASS,
    HEADER_REQUEST_ID,
    HEADER_ROLES,
    HEADER_UNITS,
    HEADER_USER,
    AssertionVerifier,
    InvalidAssertion,
)
from dpiguard.demo.data import Dataset, PatientRecord
from dpiguard.demo.fhir_server import register_fhir

STATIC_DIR = Path(__file__).parent / "static"
FHIR_JSON = "application/fhir+json"
MAX_NOTE_LENGTH = 5000
PUBLIC_ENDPOINTS = frozenset({"static", "favicon"})
CATEGORY_PAGES = (
    ("administrative", "Administratif"),
    ("notes", "Notes cliniques"),
    ("biology", "Biologie"),
    ("prescriptions", "Prescriptions"),
    ("imaging", "Imagerie"),
)
NOT_THROUGH_DPIGUARD = "request did not come through dpiguard"


@dataclass(frozen=True)
class Identity:
    """Who dpiguard says is calling, taken from the verified assertion."""

    user: str
    roles: tuple[str, ...]
    units: tuple[str, ...]
    claims: dict = field(default_factory=dict)
    request_id: str = ""
    break_glass: str = ""


class RecordStore:
    """The records of the dataset, copied so that added notes never touch the dataset."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._records: dict[str, PatientRecord] = copy.deepcopy(dataset.records)
        self._lock = threading.Lock()

    def get(self, patient_id: str) -> PatientRecord | None:
        return self._records.get(patient_id)

    def add_note(self, patient_id: str, author: str, text: str) -> dict:
        with self._lock:
            notes = self._records[patient_id].clinical_notes
            note = {
                "id": f"{patient_id}-note-{len(notes) + 1}",
                "date": int(time.time()),
                "author": author,
                "author_name": _display_name(self.dataset, author),
                "text": text,
            }
            notes.append(note)
            return dict(note)

    def snapshot(self, patient_id: str, category: str) -> list[dict] | dict:
        """A copy of one category of a record, safe to serialize outside the lock."""
        with self._lock:
            return copy.deepcopy(getattr(self._records[patient_id], category))


def _display_name(dataset: Dataset, login: str) -> str:
    member = dataset.staff_member(login)
    return member.display_name if member else login


# --- application factory ----------------------------------------------------------


def create_app(
    dataset: Dataset,
    verifier: AssertionVerifier | None,
    require_assertion: bool = True,
) -> Flask:
    """Build the demo DPI over ``dataset``.

    With ``require_assertion`` (the default, and the point of the demo) a verifier is
    mandatory. Without it, requests lacking an assertion are trusted on the plain
    ``X-DPIGuard-User/Roles/Units`` headers (development only); a present assertion is
    still verified when a verifier is available.
    """
    if require_assertion and verifier is None:
        raise ValueError("require_assertion=True needs an AssertionVerifier")
    app = Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    app.jinja_loader = DictLoader(TEMPLATES)
    app.jinja_env.filters["when"] = _format_time
    store = RecordStore(dataset)
    app.extensions["dpiguard_demo"] = store

    @app.before_request
    def authenticate():
        if request.endpoint in PUBLIC_ENDPOINTS:
            return None
        identity, error = _identity_from_request(verifier, require_assertion)
        if identity is None:
            return _unauthorized(error)
        g.identity = identity
        return None

    @app.context_processor
    def inject_identity():
        return {"identity": g.get("identity"), "units": {u.code: u.name for u in dataset.units}}

    @app.get("/favicon.ico", endpoint="favicon")
    def favicon():
        return Response(status=204)

    _register_pages(app, store)
    _register_api(app, store)
    register_fhir(app, dataset)
    _register_errors(app)
    return app


# --- identity ---------------------------------------------------------------------


def _identity_from_request(
    verifier: AssertionVerifier | None, require_assertion: bool
) -> tuple[Identity | None, str]:
    token = request.headers.get(HEADER_ASSERTION, "").strip()
    user_header = request.headers.get(HEADER_USER, "").strip()
    if not token:
        if require_assertion:
            return None, "missing assertion"
        if not user_header:
            return None, "missing user header"
        return _identity(user_header, _csv(HEADER_ROLES), _csv(HEADER_UNITS), {}), ""
    if verifier is None:
        return None, "no verifier configured"
    try:
        claims = verifier.verify(token)
    except InvalidAssertion as exc:
        return None, str(exc)
    if user_header != claims["sub"]:
        return None, "user header does not match the assertion"
    return _identity(claims["sub"], claims.get("roles", []), claims.get("units", []), claims), ""


def _identity(user: str, roles, units, claims: dict) -> Identity:
    return Identity(
        user=user,
        roles=tuple(roles),
        units=tuple(units),
        claims=claims,
        request_id=request.headers.get(HEADER_REQUEST_ID, ""),
        break_glass=request.headers.get(HEADER_BREAK_GLASS, ""),
    )


def _csv(header: str) -> list[str]:
    return [item.strip() for item in request.headers.get(header, "").split(",") if item.strip()]


def _unauthorized(detail: str) -> Response:
    family = _route_family(request.path)
    if family == "fhir":
        return _fhir_outcome(401, "security", f"{NOT_THROUGH_DPIGUARD}: {detail}")
    if family == "api":
        return _json({"error": NOT_THROUGH_DPIGUARD, "detail": detail}, 401)
    html = render_template("unauthorized.html", detail=detail, message=NOT_THROUGH_DPIGUARD)
    return Response(html, status=401, mimetype="text/html")


def _route_family(path: str) -> str:
    if path.startswith("/fhir/"):
        return "fhir"
    if path.startswith("/api/"):
        return "api"
    return "html"


# --- HTML pages -------------------------------------------------------------------


def _register_pages(app: Flask, store: RecordStore) -> None:
    dataset = store.dataset

    @app.get("/")
    def home():
        return render_template("home.html", claims=g.identity.claims)

    @app.get("/patients")
    def patient_list():
        stays = {s.patient_id: s for s in dataset.stays if s.is_open}
        patients = dataset.patients_in_units(g.identity.units)
        return render_template("patients.html", patients=patients, stays=stays)

    @app.get("/patients/<pid>")
    def patient_administrative(pid: str):
        return _category_page(store, pid, "administrative", "administrative")

    @app.get("/patients/<pid>/notes")
    def patient_notes(pid: str):
        return _category_page(store, pid, "notes", "clinical_notes")

    @app.post("/patients/<pid>/notes")
    def patient_add_note(pid: str):
        if store.get(pid) is None:
            return _not_found_page(pid)
        text = request.form.get("text", "").strip()
        if not text or len(text) > MAX_NOTE_LENGTH:
            return Response("note text is empty or too long", status=400, mimetype="text/plain")
        store.add_note(pid, g.identity.user, text)
        return redirect(url_for("patient_notes", pid=pid), code=303)

    @app.get("/patients/<pid>/biology")
    def patient_biology(pid: str):
        return _category_page(store, pid, "biology", "biology")

    @app.get("/patients/<pid>/prescriptions")
    def patient_prescriptions(pid: str):
        return _category_page(store, pid, "prescriptions", "prescriptions")

    @app.get("/patients/<pid>/imaging")
    def patient_imaging(pid: str):
        return _category_page(store, pid, "imaging", "imaging")


def _category_page(store: RecordStore, pid: str, page: str, category: str):
    if store.get(pid) is None:
        return _not_found_page(pid)
    return render_template(
        f"{page}.html",
        patient=store.dataset.patient(pid),
        stay=store.dataset.open_stay(pid),
        items=store.snapshot(pid, category),
        tabs=CATEGORY_PAGES,
        active=page,
    )


def _not_found_page(pid: str) -> Response:
    html = render_template("error.html", status=404, message="patient inconnu", what=pid)
    return Response(html, status=404, mimetype="text/html")


# --- JSON API ---------------------------------------------------------------------


API_CATEGORIES = {
    "notes": "clinical_notes",
    "biology": "biology",
    "prescriptions": "prescriptions",
    "imaging": "imaging",
}


def _register_api(app: Flask, store: RecordStore) -> None:
    @app.get("/api/patients/<pid>")
    def api_patient(pid: str):
        if store.get(pid) is None:
            return _json_not_found(pid)
        return _json(store.snapshot(pid, "administrative"))

    @app.get("/api/patients/<pid>/<any(notes, biology, prescriptions, imaging):category>")
    def api_category(pid: str, category: str):
        if store.get(pid) is None:
            return _json_not_found(pid)
        items = store.snapshot(pid, API_CATEGORIES[category])
        return _json({"patient_id": pid, "category": category, "items": items})

    @app.post("/api/patients/<pid>/notes")
    def api_add_note(pid: str):
        if store.get(pid) is None:
            return _json_not_found(pid)
        body = request.get_json(silent=True)
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_NOTE_LENGTH:
            return _json({"error": "expected a JSON object with a non-empty 'text'"}, 400)
        note = store.add_note(pid, g.identity.user, text.strip())
        response = _json(note, 201)
        response.headers["Location"] = url_for("api_category", pid=pid, category="notes")
        return response


def _json(payload, status: int = 200, mimetype: str = "application/json") -> Response:
    return Response(orjson.dumps(payload), status=status, mimetype=mimetype)


def _json_not_found(pid: str) -> Response:
    return _json({"error": "unknown patient", "patient_id": pid}, 404)


# --- FHIR R4 (dpiguard/demo/fhir_server.py) ---------------------------------------


def _fhir_outcome(status: int, code: str, diagnostics: str) -> Response:
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
    return _json(outcome, status, mimetype=FHIR_JSON)


# --- errors -----------------------------------------------------------------------


def _register_errors(app: Flask) -> None:
    @app.errorhandler(404)
    def not_found(_error):
        return _error_response(404, "not found")

    @app.errorhandler(405)
    def method_not_allowed(_error):
        return _error_response(405, "method not allowed")


def _error_response(status: int, message: str) -> Response:
    family = _route_family(request.path)
    if family == "fhir":
        return _fhir_outcome(status, "not-found" if status == 404 else "not-supported", message)
    if family == "api":
        return _json({"error": message}, status)
    html = render_template("error.html", status=status, message=message, what=request.path)
    return Response(html, status=status, mimetype="text/html")


def _format_time(epoch: int | None) -> str:
    if epoch is None:
        return "—"
    return time.strftime("%d/%m/%Y %H:%M", time.localtime(epoch))


# --- serving ----------------------------------------------------------------------


def serve(app: Flask, host: str, port: int, background: bool = True) -> BaseWSGIServer:
    """Run ``app`` on werkzeug's threaded server and return it (call ``.shutdown()`` to stop).

    By default the server runs in a daemon thread; ``background=False`` serves in the
    calling thread until another thread calls ``shutdown()``.
    """
    server = make_server(host, port, app, threaded=True)
    if background:
        thread = threading.Thread(target=server.serve_forever, name="demo-dpi", daemon=True)
        thread.start()
    else:
        server.serve_forever()
    return server


def start_in_thread(app: Flask, host: str = "127.0.0.1", port: int = 0) -> tuple[BaseWSGIServer, int]:
    """Start ``app`` in the background on ``port`` (0: a free one); return (server, port)."""
    server = serve(app, host, port, background=True)
    return server, server.server_port


# --- templates --------------------------------------------------------------------

_LAYOUT = """<!doctype html>
<html lang="fr">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{% block title %}DPI démo{% endblock %} · DPI démo</title>
  <link rel="stylesheet" href="{{ url_for('static', filename='style.css') }}">
</head>
<body>
<header class="topbar">
  <a href="{{ url_for('home') }}">🏥 DPI démo — Hôpital fictif</a>
  {% if identity %}
  <div class="identity">
    <span class="who">{{ identity.user }}</span>
    {% for role in identity.roles %}<span class="badge">{{ role }}</span>{% endfor %}
    {% for unit in identity.units %}<span class="badge">{{ unit }}</span>{% endfor %}
    {% if identity.break_glass %}<span class="badge warn">bris de glace</span>{% endif %}
    <br><span>identité reçue de dpiguard{% if identity.claims %} (assertion vérifiée){% endif %}</span>
  </div>
  {% endif %}
</header>
<main>
{% block content %}{% endblock %}
</main>
<footer>
  Données entièrement fictives.
  {% if identity and identity.request_id %} · requête <code>{{ identity.request_id }}</code>{% endif %}
</footer>
</body>
</html>
"""

_HOME = """{% extends "layout.html" %}
{% block title %}Accueil{% endblock %}
{% block content %}
<div class="card">
  <h1>Bonjour {{ identity.user }}</h1>
  <p>Cette application ne gère aucune connexion : elle croit uniquement l'identité signée par dpiguard.</p>
  <dl class="fields">
    <dt>Rôles</dt><dd>{{ identity.roles | join(', ') or '—' }}</dd>
    <dt>Unités</dt>
    <dd>{% for code in identity.units %}{{ units.get(code, code) }} ({{ code }}){% if not loop.last %}, {% endif %}{% else %}—{% endfor %}</dd>
    {% if claims %}
    <dt>Session</dt><dd><code>{{ claims.sid }}</code></dd>
    <dt>Assertion émise</dt><dd>{{ claims.iat | when }}</dd>
    <dt>Assertion expire</dt><dd>{{ claims.exp | when }}</dd>
    <dt>Audience</dt><dd><code>{{ claims.aud }}</code></dd>
    {% endif %}
  </dl>
</div>
<div class="card">
  <h2>Accès</h2>
  <ul>
    <li><a href="{{ url_for('patient_list') }}">Patients présents dans mes unités</a></li>
  </ul>
  <p class="muted">API JSON : <code>/api/patients/&lt;id&gt;</code> · FHIR R4 : <code>/fhir/Patient/&lt;id&gt;</code>,
  <code>/fhir/Observation?patient=&lt;id&gt;</code></p>
</div>
{% endblock %}
"""

_PATIENTS = """{% extends "layout.html" %}
{% block title %}Patients{% endblock %}
{% block content %}
<div class="card">
  <h1>Patients présents dans mes unités</h1>
  {% if not identity.units %}
  <p class="muted">Aucune unité de soins ne vous est rattachée.</p>
  {% elif not patients %}
  <p class="muted">Aucun patient actuellement hospitalisé dans vos unités.</p>
  {% else %}
  <table>
    <thead><tr><th>Dossier</th><th>Nom</th><th>Naissance</th><th>Unité</th><th>Entrée</th></tr></thead>
    <tbody>
    {% for p in patients %}
      <tr>
        <td><a href="{{ url_for('patient_administrative', pid=p.patient_id) }}">{{ p.patient_id }}</a></td>
        <td>{{ p.display_name }}</td>
        <td>{{ p.birth_date }}</td>
        <td>{{ units.get(stays[p.patient_id].unit, stays[p.patient_id].unit) }}</td>
        <td>{{ stays[p.patient_id].start | when }}</td>
      </tr>
    {% endfor %}
    </tbody>
  </table>
  <p class="muted">{{ patients | length }} patient(s).</p>
  {% endif %}
</div>
{% endblock %}
"""

_PATIENT_BASE = """{% extends "layout.html" %}
{% block title %}{{ patient.display_name }}{% endblock %}
{% block content %}
<div class="card">
  <h1>{{ patient.display_name }} <span class="muted">· {{ patient.patient_id }}</span></h1>
  <span class="muted">Né(e) le {{ patient.birth_date }} ·
  {% if stay %}hospitalisé(e) en {{ units.get(stay.unit, stay.unit) }} depuis le {{ stay.start | when }}
  {% else %}pas de séjour en cours{% endif %}</span>
</div>
<nav class="tabs">
  {% for page, label in tabs %}
  <a class="{{ 'active' if page == active else '' }}"
     href="{{ url_for('patient_' ~ page, pid=patient.patient_id) }}">{{ label }}</a>
  {% endfor %}
</nav>
<div class="card">
{% block category %}{% endblock %}
</div>
{% endblock %}
"""

_ADMINISTRATIVE = """{% extends "patient.html" %}
{% block category %}
<h2>Données administratives</h2>
<dl class="fields">
  <dt>Nom</dt><dd>{{ items.family_name }}</dd>
  <dt>Prénom</dt><dd>{{ items.given_name }}</dd>
  <dt>Sexe</dt><dd>{{ items.sex }}</dd>
  <dt>Date de naissance</dt><dd>{{ items.birth_date }}</dd>
  <dt>Adresse</dt><dd>{{ items.address.line }}, {{ items.address.postal_code }} {{ items.address.city }}</dd>
  <dt>Téléphone</dt><dd>{{ items.phone }}</dd>
  <dt>N° d'assurance</dt><dd><code>{{ items.insurance_number }}</code></dd>
</dl>
{% endblock %}
"""

_NOTES = """{% extends "patient.html" %}
{% block category %}
<h2>Notes cliniques</h2>
{% for note in items | reverse %}
<div class="note">
  <div class="meta">{{ note.date | when }} — {{ note.author_name }}</div>
  <div>{{ note.text }}</div>
</div>
{% else %}
<p class="muted">Aucune note.</p>
{% endfor %}
<form method="post" action="{{ url_for('patient_add_note', pid=patient.patient_id) }}">
  <label for="text"><strong>Nouvelle note</strong></label>
  <textarea id="text" name="text" required maxlength="5000"></textarea>
  <button type="submit">Ajouter</button>
</form>
{% endblock %}
"""

_BIOLOGY = """{% extends "patient.html" %}
{% block category %}
<h2>Biologie</h2>
<table>
  <thead><tr><th>Date</th><th>Examen</th><th>Code</th><th>Résultat</th><th>Référence</th></tr></thead>
  <tbody>
  {% for r in items %}
    <tr>
      <td>{{ r.date | when }}</td>
      <td>{{ r.label }}</td>
      <td><code>{{ r.code }}</code></td>
      <td class="{{ 'abnormal' if r.value < r.low or r.value > r.high else '' }}">{{ r.value }} {{ r.unit }}</td>
      <td class="muted">{{ r.low }} – {{ r.high }}</td>
    </tr>
  {% endfor %}
  </tbody>
</table>
{% endblock %}
"""

_PRESCRIPTIONS = """{% extends "patient.html" %}
{% block category %}
<h2>Prescriptions</h2>
<table>
  <thead><tr><th>Médicament</th><th>Dose</th><th>Voie</th><th>Fréquence</th><th>Prescripteur</th><th>Date</th></tr></thead>
  <tbody>
  {% for p in items %}
    <tr>
      <td>{{ p.drug }}</td><td>{{ p.dose }}</td><td>{{ p.route }}</td><td>{{ p.frequency }}</td>
      <td>{{ p.prescriber_name }}</td><td>{{ p.date | when }}</td>
    </tr>
  {% endfor %}
  </tbody>
</table>
{% endblock %}
"""

_IMAGING = """{% extends "patient.html" %}
{% block category %}
<h2>Imagerie</h2>
{% for s in items %}
<div class="note">
  <div class="meta">{{ s.date | when }} — {{ s.modality }} — {{ s.description }}</div>
  <div>{{ s.report }}</div>
</div>
{% else %}
<p class="muted">Aucun examen d'imagerie.</p>
{% endfor %}
{% endblock %}
"""

_UNAUTHORIZED = """{% extends "layout.html" %}
{% block title %}Accès refusé{% endblock %}
{% block content %}
<div class="card alert">
  <h1>401 — {{ message }}</h1>
  <p>Cette application n'accepte que les requêtes relayées par dpiguard avec une identité signée.</p>
  <p class="muted">Détail : {{ detail }}</p>
</div>
{% endblock %}
"""

_ERROR = """{% extends "layout.html" %}
{% block title %}{{ status }}{% endblock %}
{% block content %}
<div class="card alert">
  <h1>{{ status }} — {{ message }}</h1>
  <p class="muted"><code>{{ what }}</code></p>
</div>
{% endblock %}
"""

TEMPLATES = {
    "layout.html": _LAYOUT,
    "home.html": _HOME,
    "patients.html": _PATIENTS,
    "patient.html": _PATIENT_BASE,
    "administrative.html": _ADMINISTRATIVE,
    "notes.html": _NOTES,
    "biology.html": _BIOLOGY,
    "prescriptions.html": _PRESCRIPTIONS,
    "imaging.html": _IMAGING,
    "unauthorized.html": _UNAUTHORIZED,
    "error.html": _ERROR,
}
