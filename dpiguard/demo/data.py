"""Synthetic hospital used by the demo: units, patients, staff, stays and medical records.

Generation is deterministic: the same ``seed`` and ``now`` always give an equal ``Dataset``.
All people, addresses, phone numbers and insurance numbers are fictitious (phone numbers
use the ranges reserved in France for fiction, insurance numbers carry a ``DEMO-`` prefix).

A few fixed anchors keep tests and walkthroughs simple:

* ``dr.martin`` (doctor), ``inf.durand`` (nurse) and ``sec.bernard`` (secretary) belong to CARDIO;
* ``pha.petit`` is a pharmacist and ``acc.robert`` works at reception (no unit);
* patient ``P0001`` has an open stay in CARDIO, ``P0002`` an open stay in PNEUMO.

Passwords are deliberately absent: the demo command creates accounts and sets them.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

DEFAULT_SEED = 2026
PATIENT_COUNT = 220
DAY = 86400

ROLES = ("doctor", "nurse", "secretary", "pharmacist", "reception")
CATEGORIES = ("administrative", "clinical_notes", "biology", "prescriptions", "imaging")

UNITS = (
    ("CARDIO", "Cardiologie"),
    ("PNEUMO", "Pneumologie"),
    ("URG", "Urgences"),
    ("PEDIA", "Pédiatrie"),
    ("ONCO", "Oncologie"),
)

LOGIN_PREFIX = {
    "doctor": "dr",
    "nurse": "inf",
    "secretary": "sec",
    "pharmacist": "pha",
    "reception": "acc",
}

# (family name, given name, role, units). The anchors come first; the rest of the staff
# is drawn from the name pool below.
_ANCHOR_STAFF = (
    ("Martin", "Paul", "doctor", ("CARDIO",)),
    ("Durand", "Claire", "nurse", ("CARDIO",)),
    ("Bernard", "Sophie", "secretary", ("CARDIO",)),
    ("Petit", "Luc", "pharmacist", ()),
    ("Robert", "Nadia", "reception", ()),
)

# How many people of each role, anchors included (32 in total).
_STAFF_PLAN = {"doctor": 10, "nurse": 10, "secretary": 5, "pharmacist": 3, "reception": 4}

FAMILY_NAMES = (
    "Richard", "Dubois", "Moreau", "Laurent", "Simon", "Michel", "Lefebvre", "Leroy",
    "Roux", "David", "Bertrand", "Morel", "Fournier", "Girard", "Bonnet", "Dupont",
    "Lambert", "Fontaine", "Rousseau", "Vincent", "Muller", "Lefevre", "Faure", "Andre",
    "Mercier", "Blanc", "Guerin", "Boyer", "Garnier", "Chevalier", "Francois", "Legrand",
    "Gauthier", "Garcia", "Perrin", "Robin", "Clement", "Morin", "Nicolas", "Henry",
    "Roussel", "Mathieu", "Gautier", "Masson", "Marchand", "Duval", "Denis", "Dumont",
    "Marie", "Lemaire", "Noel", "Meyer", "Dufour", "Meunier", "Brun", "Blanchard",
    "Giraud", "Joly", "Riviere", "Lucas", "Brunet", "Gaillard", "Barbier", "Arnaud",
)
GIVEN_NAMES = {
    "F": (
        "Camille", "Léa", "Manon", "Chloé", "Inès", "Jade", "Louise", "Emma", "Alice",
        "Juliette", "Margaux", "Anne", "Isabelle", "Nathalie", "Sylvie", "Monique",
        "Françoise", "Hélène", "Élise", "Agnès", "Lucie", "Zoé", "Mathilde", "Odile",
    ),
    "M": (
        "Lucas", "Hugo", "Louis", "Jules", "Gabriel", "Arthur", "Nathan", "Théo",
        "Pierre", "Jean", "Michel", "Philippe", "Alain", "Bernard", "Jacques", "André",
        "Étienne", "Olivier", "Thomas", "Julien", "Nicolas", "Mathis", "Rémi", "Yves",
    ),
}
STREETS = (
    "rue des Lilas", "avenue de la République", "rue Victor Hugo", "boulevard Pasteur",
    "rue du Moulin", "place de l'Église", "chemin des Vignes", "rue Jean Jaurès",
    "allée des Tilleuls", "rue de la Gare", "impasse des Roses", "quai de la Loire",
)
CITIES = (
    ("99001", "Villefictive"),
    ("99002", "Saint-Exemple"),
    ("99003", "Démoville-sur-Loire"),
    ("99004", "Port-Synthèse"),
)
# Ranges reserved by ARCEP for fiction and audiovisual works.
PHONE_PREFIXES = ("01 99 00", "02 61 91", "04 65 71", "06 39 98")

# LOINC code, label, UCUM unit, low, high (reference range), decimals.
LAB_TESTS = (
    ("718-7", "Hémoglobine", "g/dL", 12.0, 17.0, 1),
    ("6690-2", "Leucocytes", "10*3/uL", 4.0, 10.0, 1),
    ("777-3", "Plaquettes", "10*3/uL", 150.0, 400.0, 0),
    ("2951-2", "Sodium", "mmol/L", 135.0, 145.0, 0),
    ("2823-3", "Potassium", "mmol/L", 3.5, 5.0, 1),
    ("2160-0", "Créatinine", "umol/L", 60.0, 110.0, 0),
    ("15074-8", "Glucose", "mmol/L", 3.9, 6.1, 1),
    ("1988-5", "Protéine C réactive", "mg/L", 0.0, 5.0, 1),
    ("10839-9", "Troponine I", "ng/L", 0.0, 34.0, 0),
)
DRUGS = (
    ("Paracétamol", "1 g", "oral", "toutes les 6 h si douleur"),
    ("Amoxicilline", "1 g", "oral", "3 fois par jour"),
    ("Enoxaparine", "4000 UI", "sous-cutanée", "1 fois par jour"),
    ("Furosémide", "40 mg", "oral", "1 fois par jour le matin"),
    ("Bisoprolol", "2,5 mg", "oral", "1 fois par jour"),
    ("Salbutamol", "100 µg/dose", "inhalée", "2 bouffées si besoin"),
    ("Oméprazole", "20 mg", "oral", "1 fois par jour"),
    ("Metformine", "850 mg", "oral", "2 fois par jour"),
    ("Atorvastatine", "20 mg", "oral", "1 fois par jour le soir"),
    ("Ondansétron", "8 mg", "intraveineuse", "2 fois par jour"),
)
IMAGING = (
    ("DX", "Radiographie thoracique de face", "Pas d'opacité parenchymateuse. Cœur de taille normale."),
    ("CT", "Scanner thoraco-abdomino-pelvien", "Pas d'anomalie évolutive par rapport au précédent examen."),
    ("MR", "IRM cérébrale", "Absence de lésion ischémique récente."),
    ("US", "Échographie abdominale", "Foie de taille normale, pas de dilatation des voies biliaires."),
    ("US", "Échocardiographie transthoracique", "FEVG conservée estimée à 60 %, pas de valvulopathie."),
)
NOTE_TEMPLATES = (
    "Patient(e) vu(e) ce jour. État général conservé, constantes stables.",
    "Douleur bien contrôlée sous traitement. Poursuite de la surveillance.",
    "Bilan biologique prélevé ce matin, résultats à contrôler.",
    "Apyrétique depuis 48 h. Mobilisation au fauteuil bien tolérée.",
    "Entretien avec la famille : projet de sortie discuté.",
    "Tension artérielle à surveiller, réévaluation du traitement demain.",
    "Saturation correcte en air ambiant. Kinésithérapie respiratoire poursuivie.",
    "Nuit calme. Alimentation reprise sans difficulté.",
)


@dataclass(frozen=True)
class Unit:
    code: str
    name: str


@dataclass(frozen=True)
class Patient:
    patient_id: str
    family_name: str
    given_name: str
    sex: str  # "F" or "M"
    birth_date: str  # ISO date
    address_line: str
    postal_code: str
    city: str
    phone: str
    insurance_number: str

    @property
    def display_name(self) -> str:
        return f"{self.family_name.upper()} {self.given_name}"


@dataclass(frozen=True)
class StaffMember:
    login: str
    display_name: str
    role: str
    units: tuple[str, ...]


@dataclass(frozen=True)
class Stay:
    stay_id: str
    patient_id: str
    unit: str
    start: int  # epoch seconds
    end: int | None  # None = still in the unit

    @property
    def is_open(self) -> bool:
        return self.end is None


@dataclass(frozen=True)
class Membership:
    login: str
    unit: str
    start: int
    end: int | None


@dataclass(frozen=True)
class Assignment:
    patient_id: str
    login: str
    kind: str
    start: int
    end: int | None


@dataclass
class PatientRecord:
    """The medical record of one patient, one attribute per data category."""

    administrative: dict
    clinical_notes: list[dict] = field(default_factory=list)
    biology: list[dict] = field(default_factory=list)
    prescriptions: list[dict] = field(default_factory=list)
    imaging: list[dict] = field(default_factory=list)


@dataclass
class Dataset:
    seed: int
    now: int
    units: list[Unit]
    patients: list[Patient]
    staff: list[StaffMember]
    stays: list[Stay]
    memberships: list[Membership]
    assignments: list[Assignment]
    records: dict[str, PatientRecord]

    def patient(self, patient_id: str) -> Patient | None:
        return next((p for p in self.patients if p.patient_id == patient_id), None)

    def staff_member(self, login: str) -> StaffMember | None:
        return next((s for s in self.staff if s.login == login), None)

    def open_stay(self, patient_id: str) -> Stay | None:
        return next((s for s in self.stays if s.patient_id == patient_id and s.is_open), None)

    def patients_in_units(self, units: set[str] | list[str] | tuple[str, ...]) -> list[Patient]:
        """Patients with an open stay in one of ``units``, in patient id order."""
        wanted = set(units)
        staying = {s.patient_id for s in self.stays if s.is_open and s.unit in wanted}
        return [p for p in self.patients if p.patient_id in staying]


def build_dataset(seed: int = DEFAULT_SEED, now: int | None = None) -> Dataset:
    """Generate the synthetic hospital; times are relative to ``now`` (default: current time)."""
    now = int(time.time()) if now is None else int(now)
    rng = random.Random(seed)
    units = [Unit(code, name) for code, name in UNITS]
    staff = _build_staff(rng)
    memberships = _build_memberships(rng, staff, now)
    patients = [_build_patient(rng, number) for number in range(1, PATIENT_COUNT + 1)]
    stays = _build_stays(rng, patients, now)
    assignments = _build_assignments(rng, staff, stays, now)
    records = {
        p.patient_id: _build_record(rng, p, stays, staff, now) for p in patients
    }
    return Dataset(seed, now, units, patients, staff, stays, memberships, assignments, records)


# --- staff ------------------------------------------------------------------------


def _build_staff(rng: random.Random) -> list[StaffMember]:
    taken = {family for family, *_ in _ANCHOR_STAFF}
    pool = [name for name in FAMILY_NAMES if name not in taken]
    rng.shuffle(pool)
    people = list(_ANCHOR_STAFF)
    unit_codes = [code for code, _ in UNITS]
    for role, count in _STAFF_PLAN.items():
        already = sum(1 for person in people if person[2] == role)
        for index in range(count - already):
            sex = rng.choice("FM")
            given = rng.choice(GIVEN_NAMES[sex])
            units = _staff_units(role, index, unit_codes)
            people.append((pool.pop(), given, role, units))
    return [_staff_member(*person) for person in people]


def _staff_units(role: str, index: int, unit_codes: list[str]) -> tuple[str, ...]:
    """Spread clinical staff over the units round-robin; two of them work in two units."""
    if role in ("pharmacist", "reception"):
        return ()
    # Anchors already cover CARDIO for doctors, nurses and secretaries: start after it.
    primary = unit_codes[(index + 1) % len(unit_codes)]
    if role == "doctor" and index == 1:
        return (primary, "URG") if primary != "URG" else (primary, "CARDIO")
    if role == "nurse" and index == 0:
        return (primary, "URG") if primary != "URG" else (primary, "PNEUMO")
    return (primary,)


def _staff_member(family: str, given: str, role: str, units: tuple[str, ...]) -> StaffMember:
    login = f"{LOGIN_PREFIX[role]}.{_ascii_lower(family)}"
    title = "Dr " if role == "doctor" else ""
    return StaffMember(login, f"{title}{given} {family}", role, tuple(units))


def _ascii_lower(text: str) -> str:
    table = str.maketrans("àâäéèêëîïôöûùüç", "aaaeeeeiioouuuc")
    return text.lower().translate(table).replace(" ", "-")


def _build_memberships(rng: random.Random, staff: list[StaffMember], now: int) -> list[Membership]:
    return [
        Membership(member.login, unit, now - rng.randint(30, 2000) * DAY, None)
        for member in staff
        for unit in member.units
    ]


# --- patients and stays -----------------------------------------------------------


def _build_patient(rng: random.Random, number: int) -> Patient:
    sex = rng.choice("FM")
    birth = f"{rng.randint(1932, 2023)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    postal_code, city = rng.choice(CITIES)
    phone = f"{rng.choice(PHONE_PREFIXES)} {rng.randint(0, 99):02d} {rng.randint(0, 99):02d}"
    insurance = (
        f"DEMO-{1 if sex == 'M' else 2}{birth[2:4]}{birth[5:7]}99"
        f"{rng.randint(0, 999):03d}{rng.randint(0, 999):03d}"
    )
    return Patient(
        patient_id=f"P{number:04d}",
        family_name=rng.choice(FAMILY_NAMES),
        given_name=rng.choice(GIVEN_NAMES[sex]),
        sex=sex,
        birth_date=birth,
        address_line=f"{rng.randint(1, 120)} {rng.choice(STREETS)}",
        postal_code=postal_code,
        city=city,
        phone=phone,
        insurance_number=insurance,
    )


_ANCHOR_STAYS = {"P0001": "CARDIO", "P0002": "PNEUMO"}


def _build_stays(rng: random.Random, patients: list[Patient], now: int) -> list[Stay]:
    unit_codes = [code for code, _ in UNITS]
    stays: list[Stay] = []
    for patient in patients:
        pid = patient.patient_id
        draw = rng.random()
        unit = _ANCHOR_STAYS.get(pid) or rng.choice(unit_codes)
        stay_id = f"S{len(stays) + 1:05d}"
        if pid in _ANCHOR_STAYS or draw < 0.80:
            start = now - rng.randint(1 * 3600, 10 * DAY)
            stays.append(Stay(stay_id, pid, unit, start, None))
        elif draw < 0.93:
            end = now - rng.randint(2 * DAY, 20 * DAY)
            start = end - rng.randint(1 * DAY, 10 * DAY)
            stays.append(Stay(stay_id, pid, unit, start, end))
    return stays


def _build_assignments(
    rng: random.Random, staff: list[StaffMember], stays: list[Stay], now: int
) -> list[Assignment]:
    """Two doctors referring a patient who stays in a unit they do not belong to."""
    pairs = (("PNEUMO", "CARDIO"), ("ONCO", "URG"))
    assignments = []
    for doctor_unit, patient_unit in pairs:
        doctor = next(
            s for s in staff
            if s.role == "doctor" and s.units == (doctor_unit,)
        )
        candidates = [
            s.patient_id for s in stays
            if s.is_open and s.unit == patient_unit and s.patient_id not in _ANCHOR_STAYS
        ]
        patient_id = rng.choice(candidates)
        start = now - rng.randint(1, 5) * DAY
        assignments.append(Assignment(patient_id, doctor.login, "referring_physician", start, None))
    return assignments


# --- medical records --------------------------------------------------------------


def _build_record(
    rng: random.Random,
    patient: Patient,
    stays: list[Stay],
    staff: list[StaffMember],
    now: int,
) -> PatientRecord:
    stay = next((s for s in stays if s.patient_id == patient.patient_id), None)
    period_start = stay.start if stay else now - 60 * DAY
    period_end = stay.end if stay and stay.end else now
    unit = stay.unit if stay else None
    clinicians = [s for s in staff if s.role in ("doctor", "nurse") and (unit in s.units)]
    clinicians = clinicians or [s for s in staff if s.role == "doctor"]
    doctors = [s for s in clinicians if s.role == "doctor"] or [
        s for s in staff if s.role == "doctor"
    ]

    def moment() -> int:
        return rng.randint(period_start, max(period_start, period_end))

    return PatientRecord(
        administrative=_administrative(patient),
        clinical_notes=_notes(rng, patient.patient_id, clinicians, moment),
        biology=_biology(rng, patient.patient_id, moment),
        prescriptions=_prescriptions(rng, patient.patient_id, doctors, moment),
        imaging=_imaging(rng, patient.patient_id, moment),
    )


def _administrative(patient: Patient) -> dict:
    return {
        "patient_id": patient.patient_id,
        "family_name": patient.family_name,
        "given_name": patient.given_name,
        "sex": patient.sex,
        "birth_date": patient.birth_date,
        "address": {
            "line": patient.address_line,
            "postal_code": patient.postal_code,
            "city": patient.city,
            "country": "FR",
        },
        "phone": patient.phone,
        "insurance_number": patient.insurance_number,
    }


def _notes(rng, pid, authors, moment) -> list[dict]:
    notes = []
    for _ in range(rng.randint(2, 4)):
        author = rng.choice(authors)
        notes.append({
            "date": moment(),
            "author": author.login,
            "author_name": author.display_name,
            "text": rng.choice(NOTE_TEMPLATES),
        })
    return _numbered(sorted(notes, key=lambda note: note["date"]), f"{pid}-note")


def _biology(rng, pid, moment) -> list[dict]:
    results = []
    for test in rng.sample(LAB_TESTS, rng.randint(3, 6)):
        code, label, unit, low, high, decimals = test
        spread = (high - low) or 1.0
        value = round(rng.uniform(low - 0.2 * spread, high + 0.3 * spread), decimals)
        results.append({
            "code": code,
            "label": label,
            "value": max(value, 0.0),
            "unit": unit,
            "low": low,
            "high": high,
            "date": moment(),
        })
    return _numbered(sorted(results, key=lambda result: result["date"]), f"{pid}-bio")


def _prescriptions(rng, pid, prescribers, moment) -> list[dict]:
    prescriptions = []
    for index, drug in enumerate(rng.sample(DRUGS, rng.randint(1, 3))):
        name, dose, route, frequency = drug
        prescriber = rng.choice(prescribers)
        prescriptions.append({
            "id": f"{pid}-rx-{index + 1}",
            "drug": name,
            "dose": dose,
            "route": route,
            "frequency": frequency,
            "prescriber": prescriber.login,
            "prescriber_name": prescriber.display_name,
            "date": moment(),
        })
    return prescriptions


def _imaging(rng, pid, moment) -> list[dict]:
    studies = []
    for index, study in enumerate(rng.sample(IMAGING, rng.randint(0, 2))):
        modality, description, report = study
        studies.append({
            "id": f"{pid}-img-{index + 1}",
            "modality": modality,
            "description": description,
            "report": report,
            "date": moment(),
        })
    return studies


def _numbered(items: list[dict], prefix: str) -> list[dict]:
    """Give chronologically sorted items ids ``PREFIX-1``, ``PREFIX-2``... (id first)."""
    return [{"id": f"{prefix}-{index}", **item} for index, item in enumerate(items, start=1)]
