"""Decision microbenchmarks and the memory of one instance, with the real services and a real Redis.

Run by :mod:`benchmarks.run` in its own process (pinned to one core) against the Redis the harness
loaded: ``python -m benchmarks.micro --config FILE --scale STAFF,PATIENTS,LINKS,ACCOUNTS --seed S --now T``.
Prints one JSON object.

What is timed is :meth:`dpiguard.decision.pipeline.Pipeline.decide` exactly as the addon calls it (trace record
written to the configured file, identity headers and assertion built):

- **hit**: session and care-team decision in the in-process caches: ``decide(io=False)``;
- **facts_tier**: session cached, decision not, the care-team facts of the same user and patient cached (read for
  another category, :class:`dpiguard.decision.access.AccessFacts`): ``decide(io=False)``, no Redis;
- **redis_tier**: session cached, decision not (nor the facts of the pair): ``decide(io=False)`` raises ``NeedIO``, then
  ``decide(io=True)`` reads the care team in one pipelined round trip with the sync client (the addon
  reads the same facts on the event loop with an asyncio client, dpiguard/edge/prefetch.py, then decides
  in-process; that client is not included);
- **cold**: neither session nor decision (nor facts) cached: same sequence, plus the session read from Redis;
- **fhir_answer**: :meth:`FhirEnforcer.process_response` on a 20-entry searchset Bundle (thread CPU), nothing
  hidden and half of the entries hidden, reported per answer and per entry.

Memory (``--part memory``, its own process so that nothing of the timings is counted): RSS of this
process once built and started (policy, keys, clients, bus), then after opening a session for every
staff member, then after filling the decision cache with ``--fill`` distinct decisions. The fill runs
on :data:`FILL_THREADS` threads that each decide their own share in turn, so at most that many
decisions are in flight, as in a proxy (one per cold request being decided). Queuing the whole fill
at once (``ThreadPoolExecutor.map`` creates every future up front: about 1 kB each) left those
futures' memory between the long-lived cache entries, and RSS counted it: 2,300–2,800 bytes per
decision instead of about 600. The mitmproxy part of an instance is measured under load by the
harness (RSS of (c)).
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import threading
import time

import orjson

from dpiguard.config import load_config
from dpiguard.decision.access import facts_key
from dpiguard.decision.verdict import Incoming, NeedIO
from dpiguard.services import build_services

from .dataset import Scale, assignment_rows, build_hospital, stay_rows
from .workload import API, CARE_TEAM, FHIR, PAGE, READS


def rss_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def percentiles(samples_ns: list[int], cpu_ns: list[int] | None = None) -> dict:
    out = _pcts(samples_ns)
    if cpu_ns:
        cpu = _pcts(cpu_ns)
        out["cpu"] = {k: v for k, v in cpu.items() if k != "n"}
    return out


def _pcts(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)

    def pct(p: float) -> float:
        return round(s[min(len(s) - 1, int(p / 100 * len(s)))] / 1000, 1)

    return {"n": len(s), "min_us": round(s[0] / 1000, 1), "p50_us": pct(50), "p90_us": pct(90), "p99_us": pct(99), "max_us": round(s[-1] / 1000, 1),
            "mean_us": round(sum(s) / len(s) / 1000, 1)}


def cache_structure_bytes(max_entries: int, n: int = 50_000) -> float:
    """Bytes per entry of a DecisionCache itself (tracemalloc), keys and values shaped like real ones."""
    import tracemalloc

    from dpiguard.decision.access import AccessDecision
    from dpiguard.decision.cache import DecisionCache

    rng = random.Random(3)
    now = time.time()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache = DecisionCache(max_entries=max_entries)
    for i in range(n):
        key = (f"inf.{rng.randrange(5000):05d}", f"P{rng.randrange(100_000):06d}",
               rng.choice(("clinical_notes", "biology", "prescriptions", "imaging")), "read")
        decision = AccessDecision(i % 3 == 0, f"unit:U{i % 60:03d} stay:S{i:07d}" if i % 3 == 0 else "none")
        cache.put(key, decision.as_tuple(), now + 60, cache.generation(), now=now)  # as Pipeline.care_team does
    size = (tracemalloc.get_traced_memory()[0] - before) / len(cache)
    tracemalloc.stop()
    return size


def incoming(path: str, token: str, accept: str = "application/json") -> Incoming:
    return Incoming("GET", path, {"host": "dpi.bench", "accept": accept, "authorization": f"Bearer {token}",
                                  "user-agent": "dpiguard-bench"}, "127.0.0.1", False, header_bytes=200)


def addon_decide(pipeline, req: Incoming):
    """What the addon does: in-process attempt, then the I/O attempt if needed."""
    try:
        return pipeline.decide(req, io=False)
    except NeedIO:
        return pipeline.decide(req, io=True)


BUNDLE_ENTRIES = 20
FILL_THREADS = 4


def observation_bundle(patients: list[str]) -> bytes:
    """A searchset Bundle of Observations (biology), one entry per patient reference given."""
    entries = [{"fullUrl": f"http://dpi.bench/fhir/Observation/obs-{i}", "search": {"mode": "match"}, "resource": {
        "resourceType": "Observation", "id": f"obs-{i}", "status": "final", "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7", "display": "Hémoglobine"}]},
        "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": "2026-01-01T08:00:00Z",
        "valueQuantity": {"value": 13.1, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"},
    }} for i, patient in enumerate(patients)]
    return orjson.dumps({"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries})


def fhir_bundle_costs(p, h, accounts, tokens, rng, samples: int) -> dict:
    """CPU of :meth:`FhirEnforcer.process_response` (what the ``response`` hook runs, trace record built) on a
    20-entry searchset Bundle answering ``Observation?patient=P``: every entry of P (nothing hidden), and half
    of the entries of a patient outside the user's care team (hidden, the Bundle rebuilt). Decisions warm."""
    enforcer = p.fhir
    if enforcer is None:
        return {}
    cases: dict[str, list] = {"nothing_hidden": [], "half_hidden": []}
    patients_set = set(h.patients)
    for a in accounts:
        if "biology" not in READS[a.role]:
            continue
        team = h.team_of(a)
        outsiders = [x for x in h.patients[:2000] if x not in set(team)]
        for patient in team[:5]:
            req = incoming(FHIR["biology"].format(p=patient), tokens[a.login], "application/fhir+json")
            v = addon_decide(p, req)
            if not v.allowed or v.fhir_context is None or patient not in patients_set:
                continue
            cases["nothing_hidden"].append((req, v, observation_bundle([patient] * BUNDLE_ENTRIES)))
            mixed = [patient if i % 2 == 0 else outsiders[rng.randrange(len(outsiders))] for i in range(BUNDLE_ENTRIES)]
            cases["half_hidden"].append((req, v, observation_bundle(mixed)))
    out = {"entries": BUNDLE_ENTRIES}
    for name, items in cases.items():
        if not items:
            continue
        for req, v, body in items:  # warm the decisions of every patient named
            enforcer.process_response(p, req, v, 200, "application/fhir+json", body, io=True)
        cpu, returned, hidden, rewarmed = [], 0, 0, 0
        i = 0
        while len(cpu) < samples:
            req, v, body = items[i % len(items)]
            i += 1
            c0 = time.thread_time_ns()
            try:
                status, _, record = enforcer.process_response(p, req, v, 200, "application/fhir+json", body, io=False)
            except NeedIO:  # a decision expired meanwhile (TTL, or a stay's end): warmed again, sample left out
                enforcer.process_response(p, req, v, 200, "application/fhir+json", body, io=True)
                rewarmed += 1
                if rewarmed > samples:
                    raise RuntimeError(f"FHIR answers ({name}): the warm decisions do not stay cached") from None
                continue
            cpu.append(time.thread_time_ns() - c0)
            returned, hidden = record.get("returned", 0), record.get("hidden", 0)
        pct = _pcts(cpu)
        pct["per_entry_p50_us"] = round(pct["p50_us"] / BUNDLE_ENTRIES, 1)
        pct.update(status=status, returned=returned, hidden=hidden, body_bytes=len(items[0][2]), rewarmed=rewarmed)
        out[name] = pct
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.micro")
    parser.add_argument("--config", required=True)
    parser.add_argument("--scale", required=True, help="STAFF,PATIENTS,LINKS,ACCOUNTS")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--now", type=float, required=True)
    parser.add_argument("--samples", type=int, default=3000, help="timed decisions per tier (hits: 10x)")
    parser.add_argument("--fill", type=int, default=20000, help="decisions in the cache for the memory figure")
    parser.add_argument("--part", choices=("timing", "memory"), required=True,
                        help="timing: decisions and FHIR answers; memory: RSS with sessions and decisions cached")
    args = parser.parse_args(argv)
    scale = Scale(*(int(x) for x in args.scale.split(",")))
    rng = random.Random(11)

    h = build_hospital(scale, args.seed, args.now)
    for _ in stay_rows(h, (scale.links - sum(len(s.units) for s in h.staff)) // 4):
        pass  # regenerates h.current (who stays where now) without writing
    rest = scale.links - sum(len(s.units) for s in h.staff)
    for _ in assignment_rows(h, rest - rest // 4):
        pass

    cfg = load_config(args.config)
    gc.collect()
    mem0 = rss_kib()
    s = build_services(cfg)
    s.start()
    if not s.bus.coherent:
        raise SystemExit("invalidation bus not coherent: caches would be off")
    gc.collect()
    mem_started = rss_kib()

    # Sessions: opened with SessionStore.create, the step the login endpoint takes once password and
    # TOTP are verified (the argon2 cost of logins is measured separately by the harness).
    tokens = {}
    for member in h.staff:
        tokens[member.login], _ = s.sessions.create(member.login, [member.role])
    if args.part == "memory":
        result = {"scale": scale.describe(), "memory": fill_memory(s, h, tokens, args.fill, mem0, mem_started)}
    else:
        result = {"scale": scale.describe(), **timings(s, h, tokens, rng, args.samples)}
    result["cache_stats"] = s.cache.stats()
    s.stop()
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


def timings(s, h, tokens: dict[str, str], rng: random.Random, n_samples: int) -> dict:
    p = s.pipeline
    accounts = [a for a in h.accounts if a.role != "reception" and h.team_of(a)]

    def allowed_request(a, now_rng) -> Incoming:
        team = h.team_of(a)
        cat = now_rng.choice([c for c in READS[a.role] if c in CARE_TEAM])
        table = now_rng.choice((PAGE, API, FHIR))
        return incoming(table[cat].format(p=team[now_rng.randrange(len(team))]), tokens[a.login])

    # ---- hits
    hit_reqs = [allowed_request(accounts[i % len(accounts)], rng) for i in range(1000)]
    for req in hit_reqs:
        v = addon_decide(p, req)
        assert v.allowed, (req.target, v.reason)
    samples, cpu, rewarmed = [], [], 0
    i = 0
    while len(samples) < n_samples * 10:
        req = hit_reqs[i % len(hit_reqs)]
        i += 1
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        try:
            v = p.decide(req, io=False)
        except NeedIO:  # expired meanwhile (TTL, or a stay's end): warmed again, sample left out
            p.decide(req, io=True)
            rewarmed += 1
            if rewarmed > n_samples * 10:
                raise RuntimeError("cache hits: the warm decisions do not stay cached") from None
            continue
        samples.append(time.perf_counter_ns() - t0)
        cpu.append(time.thread_time_ns() - c0)
    hit = {**percentiles(samples, cpu), "rewarmed": rewarmed}

    # ---- facts tier: decision not cached, the care-team facts of the same user and patient are (read for
    # another category): decided in-process, no Redis
    p.cache.clear()  # none of these decisions is a hit left by the loop above
    samples, cpu, outcomes = [], [], {}
    pairs = [(a, team_patient) for a in accounts[:200] for team_patient in h.team_of(a)[:3]]
    for a, patient in pairs:
        cats = [c for c in READS[a.role] if c in CARE_TEAM]
        addon_decide(p, incoming(API[cats[0]].format(p=patient), tokens[a.login]))  # reads the facts
        for cat in cats[1:]:
            if len(samples) >= n_samples:
                break
            req = incoming(PAGE[cat].format(p=patient), tokens[a.login])
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            try:
                v = p.decide(req, io=False)
            except NeedIO:  # expired meanwhile: not a sample of this tier
                continue
            samples.append(time.perf_counter_ns() - t0)
            cpu.append(time.thread_time_ns() - c0)
            outcomes[v.reason] = outcomes.get(v.reason, 0) + 1
    facts_tier = {**percentiles(samples, cpu), "outcomes": outcomes} if samples else None

    def facts_cached(login: str, patient: str) -> bool:
        return p.cache.get(facts_key(login, patient), time.time()) is not None

    # ---- Redis tier: session cached (above), decision never asked before, nor another for the same patient
    seen = {(r.headers["authorization"], r.target) for r in hit_reqs}
    samples, cpu, outcomes = [], [], {}
    while len(samples) < n_samples:
        a = accounts[rng.randrange(len(accounts))]
        cat = rng.choice([c for c in READS[a.role] if c in CARE_TEAM])
        patient = h.patients[rng.randrange(len(h.patients))] if rng.random() < 0.5 else \
            rng.choice(h.team_of(a))
        req = incoming(API[cat].format(p=patient), tokens[a.login])
        if (req.headers["authorization"], req.target) in seen or facts_cached(a.login, patient):
            continue
        seen.add((req.headers["authorization"], req.target))
        p.decide(incoming("/patients", tokens[a.login]), io=True)  # session and units cached
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        v = addon_decide(p, req)
        samples.append(time.perf_counter_ns() - t0)
        cpu.append(time.thread_time_ns() - c0)
        outcomes[v.reason] = outcomes.get(v.reason, 0) + 1
    redis_tier = {**percentiles(samples, cpu), "outcomes": outcomes}

    # ---- cold: session not in this instance's cache either
    samples, cpu, outcomes = [], [], {}
    while len(samples) < n_samples:
        a = accounts[rng.randrange(len(accounts))]
        cat = rng.choice([c for c in READS[a.role] if c in CARE_TEAM])
        patient = h.patients[rng.randrange(len(h.patients))]
        req = incoming(API[cat].format(p=patient), tokens[a.login])
        if (req.headers["authorization"], req.target) in seen or facts_cached(a.login, patient):
            continue
        seen.add((req.headers["authorization"], req.target))
        s.sessions.clear_local()
        p.drop_all()
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        v = addon_decide(p, req)
        samples.append(time.perf_counter_ns() - t0)
        cpu.append(time.thread_time_ns() - c0)
        outcomes[v.reason] = outcomes.get(v.reason, 0) + 1
    cold = {**percentiles(samples, cpu), "outcomes": outcomes}

    # ---- FHIR answer check: a 20-entry searchset Bundle, nothing hidden / half the entries hidden
    fhir_answers = fhir_bundle_costs(p, h, accounts, tokens, rng, n_samples)

    return {"hit": hit, "facts_tier": facts_tier, "redis_tier": redis_tier, "cold": cold, "fhir_answer": fhir_answers}


def fill_memory(s, h, tokens: dict[str, str], fill: int, mem0: dict, mem_started: dict) -> dict:
    """RSS with every staff session cached, then with ``fill`` decisions cached (see the module's doc)."""
    p = s.pipeline
    gc.collect()
    mem_before_fill = rss_kib()
    staff = h.staff
    fill = min(fill, s.cache.max_entries)
    total = fill * 11 // 10  # a few decisions repeat: ask for more to fill the cache

    failures: list[BaseException] = []

    def share(k: int) -> None:
        try:
            for i in range(k, total, FILL_THREADS):
                r = random.Random(i)
                member = staff[i % len(staff)]
                cat = r.choice(("clinical_notes", "biology", "prescriptions", "imaging"))
                addon_decide(p, incoming(API[cat].format(p=h.patients[r.randrange(len(h.patients))]),
                                         tokens[member.login]))
        except BaseException as exc:  # a fill cut short would make the figure wrong: fail the run
            failures.append(exc)

    t0 = time.perf_counter()
    workers = [threading.Thread(target=share, args=(k,), name=f"fill-{k}") for k in range(FILL_THREADS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if failures:
        raise RuntimeError("the fill failed") from failures[0]
    fill_seconds = time.perf_counter() - t0
    gc.collect()
    mem_filled = rss_kib()
    entries = len(s.cache)
    per_entry = (mem_filled["VmRSS"] - mem_before_fill["VmRSS"]) * 1024 / max(1, entries)
    structure = cache_structure_bytes(s.cache.max_entries)
    # A small fill partly reuses memory the process already had (its RSS grows by less than the entries
    # take): the extrapolation uses the larger of the two measures.
    at_max = mem_filled["VmRSS"] + max(per_entry, structure) * (s.cache.max_entries - entries) / 1024
    return {
        "rss_python_start_mib": round(mem0["VmRSS"] / 1024, 1),
        "rss_services_started_mib": round(mem_started["VmRSS"] / 1024, 1),
        "sessions_cached": s.sessions.local_size(),
        "rss_sessions_cached_mib": round(mem_before_fill["VmRSS"] / 1024, 1),
        "decisions_cached": entries,
        "fill_seconds": round(fill_seconds, 1),
        "fill_threads": FILL_THREADS,
        "rss_filled_mib": round(mem_filled["VmRSS"] / 1024, 1),
        "bytes_per_decision": round(per_entry),
        "max_entries": s.cache.max_entries,
        "rss_at_max_entries_mib": round(at_max / 1024, 1),
        "cache_structure_bytes_per_decision": round(structure),
        "cache_structure_at_max_entries_mib": round(structure * s.cache.max_entries / 2**20, 1),
        "extrapolated": entries < s.cache.max_entries,
    }


if __name__ == "__main__":
    sys.exit(main())
