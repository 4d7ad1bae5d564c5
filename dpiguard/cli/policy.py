"""``dpiguard policy check | test | explain | diff``: tools for the people who edit the policy files.

    dpiguard policy check [--dir policies] [--strict]       load + checks of meaning (file:line)
    dpiguard policy test FILE... [--dir D] [--junit OUT]    decision tests written by the RSSI (YAML)
    dpiguard policy seal [TEST_FILE...] [--dir D]           check + tests pass → seal.json (in service)
    dpiguard policy explain --roles R --category C --action A [--patient P] [--units U] ...
    dpiguard policy explain --request "GET /api/patients/P1/notes" --roles R ...
    dpiguard policy diff OLD_DIR NEW_DIR [--allow-changes]  decisions that change between versions

Exit codes (CI): 0 all good; 1 errors, failed tests or changed decisions; 2 usage error or a policy
that does not load (for ``test``/``explain``/``diff``).
"""

from __future__ import annotations

import getpass
import sys
import time
from pathlib import Path
from xml.etree import ElementTree as ET

from dpiguard.cli.common import config_path, load, with_config
from dpiguard.policy.files import PolicyError, read_regular_file
from dpiguard.policy.lint import lint
from dpiguard.policy.seal import SEAL_FILE, manifest, write_seal
from dpiguard.policy.sim import (
    TestFileError,
    case_failure,
    decide_category,
    decide_request,
    diff_policies,
    explain_lines,
    live_careteam,
    load_test_file,
    parse_request_line,
    run_case,
    situation_careteam,
)
from dpiguard.policy.snapshot import PolicySet
from dpiguard.policy.table import read_policy_files

DEFAULT_DIR = "policies"


def _policy_dir(args) -> Path:
    """--dir, else the configured policies.dir (--config / DPIGUARD_CONFIG), else ./policies."""
    if getattr(args, "dir", None):
        return Path(args.dir)
    if config_path(args):
        cfg = load(args, check_files=False)
        return cfg.path(cfg.policies.dir)
    return Path(DEFAULT_DIR)


def _load(directory: Path) -> PolicySet:
    return PolicySet.load(directory)


# -- check -----------------------------------------------------------------------------------------
def _fhir_routed(policies: PolicySet) -> set[tuple[str, str]]:
    """The (category, action) pairs the FHIR resource types of fhir.yaml open."""
    routed: set[tuple[str, str]] = set()
    if policies.fhir is not None:
        for rule in policies.fhir.types.values():
            for category in rule.categories:
                routed |= {(category, "read"), (category, "write")}
    return routed


def cmd_check(args) -> int:
    directory = _policy_dir(args)
    try:
        policies = _load(directory)
    except PolicyError as exc:
        print(f"{exc.file}{':' + str(exc.line) if exc.line else ''}: error: {exc.message}")
        print("policy NOT valid: dpiguard refuses it (a running proxy keeps its current version)")
        return 1
    policy = policies.table
    findings = lint(policy, _fhir_routed(policies))
    for finding in findings:
        print(finding)
    warnings = len(findings)
    summary = (f"policy OK: version {policies.version}; {len(policy.roles)} roles, {len(policy.categories)} "
               f"categories, {len(policy.rule_lines)} rules, {len(policy.routes.routes)} routes; "
               f"{warnings} warning(s)")
    print(summary)
    try:
        policies.check_seal()
        print(f"sealed: these files are the ones of {SEAL_FILE} (a proxy puts them in service)")
    except PolicyError as exc:
        print(f"not sealed: {exc.message} ({Path(exc.file).name}); a running proxy keeps its sealed set until "
              "'dpiguard policy seal' (after 'policy test')")
    if warnings and args.strict:
        print("--strict: warnings count as errors")
        return 1
    return 0


# -- test ------------------------------------------------------------------------------------------
def cmd_test(args) -> int:
    directory = _policy_dir(args)
    policy = _load(directory)  # PolicyError -> exit 2 via cli.main
    try:
        failed, total, suites = _run_tests(policy, args.files, args.verbose)
    except TestFileError as exc:
        print(f"{exc}", file=sys.stderr)
        return 2
    print(f"{total - failed} passed, {failed} failed ({total} tests, policy version {policy.version}, "
          f"{directory})")
    if args.junit:
        _write_junit(args.junit, suites, policy)
    return 1 if failed else 0


def _run_tests(policy: PolicySet, paths, verbose: bool = False):
    """Run decision test files against ``policy``: (failed, total, suites); TestFileError if one is bad."""
    suites = []
    failed = total = 0
    for path in paths:
        test = load_test_file(path)
        results = []
        started = time.perf_counter()
        for case in test.cases:
            t0 = time.perf_counter()
            decision = run_case(policy, test, case)
            problem = case_failure(case, decision)
            results.append((case, decision, problem, time.perf_counter() - t0))
            total += 1
            if problem:
                failed += 1
                print(f"FAIL {path}:{case.line}: {case.name}")
                print(f"     {problem}")
                for line in explain_lines(policy, decision):
                    print(f"     {line}")
            elif verbose:
                print(f"ok   {case.name}: {decision.outcome} ({decision.reason})")
        suites.append((path, results, time.perf_counter() - started))
    return failed, total, suites


# -- seal ------------------------------------------------------------------------------------------
def cmd_seal(args) -> int:
    """Check, test, then seal: seal.json lists the sha256 of every file that passed (policy/seal.py)."""
    directory = _policy_dir(args)
    try:
        contents = read_policy_files(directory)
        policies = PolicySet.from_contents(directory, contents)
    except PolicyError as exc:
        print(f"{exc.file}{':' + str(exc.line) if exc.line else ''}: error: {exc.message}")
        print("policy NOT valid: not sealed")
        return 1
    findings = lint(policies.table, _fhir_routed(policies))
    for finding in findings:
        print(finding)
    if findings and args.strict:
        print(f"--strict: {len(findings)} warning(s): not sealed")
        return 1
    tests = [Path(t) for t in args.tests] or sorted((directory / "tests").glob("*.test.yaml"))
    if not tests and not args.without_tests:
        print(f"no decision tests: give test files, or put them in {directory / 'tests'}/*.test.yaml "
              "(--without-tests seals without any): not sealed")
        return 1
    try:
        failed, total, _ = _run_tests(policies, tests)
        test_bytes = {_relative(t, directory): read_regular_file(t) for t in tests}
    except (TestFileError, OSError) as exc:
        print(f"{exc}: not sealed")
        return 1
    if failed:
        print(f"{failed} of {total} decision test(s) failed: not sealed")
        return 1
    seal = manifest(contents, test_bytes, sealed_by=args.by or getpass.getuser())
    path = write_seal(directory, seal)
    print(f"sealed version {seal['version']}: {len(contents)} files, {total} decision tests passed; {path}")
    return 0


def _relative(path: Path, directory: Path) -> str:
    try:
        return str(path.resolve().relative_to(directory.resolve()))
    except ValueError:
        return str(path)


def _write_junit(out: str, suites, policy: PolicySet) -> None:
    root = ET.Element("testsuites", name="dpiguard policy test")
    for path, results, duration in suites:
        failures = sum(1 for _, _, problem, _ in results if problem)
        suite = ET.SubElement(root, "testsuite", name=str(path), tests=str(len(results)),
                              failures=str(failures), errors="0", time=f"{duration:.4f}")
        props = ET.SubElement(suite, "properties")
        ET.SubElement(props, "property", name="policy_version", value=policy.version)
        ET.SubElement(props, "property", name="policy_dir", value=str(policy.directory))
        for case, decision, problem, seconds in results:
            tc = ET.SubElement(suite, "testcase", classname=Path(path).stem, name=case.name,
                               file=str(path), line=str(case.line), time=f"{seconds:.4f}")
            if problem:
                failure = ET.SubElement(tc, "failure", message=problem, type="decision")
                failure.text = "\n".join(explain_lines(policy, decision))
    ET.indent(root)
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)


# -- explain ---------------------------------------------------------------------------------------
def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def cmd_explain(args) -> int:
    policy = _load(_policy_dir(args))
    now = time.time()
    roles, units, user = _csv(args.roles), tuple(u.upper() for u in _csv(args.units)), args.user or "someone"
    source = None
    if args.fixture:
        test = load_test_file(args.fixture)
        known = test.fixture.users.get(user, {})
        roles, units = roles or known.get("roles", ()), units or known.get("units", ())
        source, now = test.fixture.careteam, test.now
        origin = f"care team from the fixture of {args.fixture}"
    elif args.live or (args.config and not (args.patient_in_unit or args.assigned)):
        from dpiguard.services import careteam_store, user_directory

        cfg = load(args, check_files=True)
        if not args.user:
            raise ValueError("--live needs --user (the login whose care team is read from Redis)")
        if not roles:
            account = user_directory(cfg).get(args.user)
            if account is None:
                raise ValueError(f"no user {args.user!r} in the user directory; give --roles")
            roles = tuple(account.roles)
        store = careteam_store(cfg)
        units = units or tuple(store.user_units(args.user, now))
        source = live_careteam(store)
        origin = "live care team (Redis)"
    else:
        source = situation_careteam(unit_stay=bool(args.patient_in_unit), assignment=args.assigned,
                                    discharged_seconds_ago=None)
        origin = ("care team given on the command line: "
                  + ", ".join(x for x in (f"patient stays in the user's unit {units[0] if units else 'UNIT-A'}"
                                          if args.patient_in_unit else "",
                                          f"user assigned ({args.assigned})" if args.assigned else "") if x)
                  if (args.patient_in_unit or args.assigned) else
                  "care team given on the command line: none (use --patient-in-unit or --assigned)")
    if not roles:
        raise ValueError("give --roles (comma-separated), or --user with --fixture/--live")
    if args.request:
        method, target = parse_request_line(args.request)
        decision = decide_request(policy, roles, method, target, user=user, units=units, careteam=source, now=now)
    else:
        if not args.category:
            raise ValueError("give --request \"GET /path\", or --category (with --action and --patient)")
        decision = decide_category(policy, roles, args.category, args.action, args.patient, user=user,
                                   units=units, careteam=source, now=now)
    print(f"user:        {user}; roles {', '.join(roles)}; units {', '.join(units) or '-'}")
    for line in explain_lines(policy, decision):
        print(line)
    print(f"({origin})")
    return 0 if decision.allowed else 1


# -- diff ------------------------------------------------------------------------------------------
def cmd_diff(args) -> int:
    old, new = _load(Path(args.old)), _load(Path(args.new))
    changes = diff_policies(old, new)
    print(f"old: {args.old} (version {old.version})\nnew: {args.new} (version {new.version})")
    decisions = [c for c in changes if c.what == "decision"]
    routes = [c for c in changes if c.what == "route"]
    if decisions:
        print(f"\n{len(decisions)} decision(s) change (role x category x action x care-team situation):")
        print(f"  {'ROLE':14} {'CATEGORY':16} {'ACTION':6} {'SITUATION':12} {'OLD':34} NEW")
        for c in decisions:
            role, category, action, situation = c.key
            print(f"  {role:14} {category:16} {action:6} {situation:12} {c.old:34} {c.new}")
    if routes:
        print(f"\n{len(routes)} address(es) map differently:")
        for c in routes:
            method, path = c.key
            print(f"  {method:6} {path:48} {c.old:28} -> {c.new}")
    if not changes:
        print("\nno decision changes")
        return 0
    return 0 if args.allow_changes else 1


# -- parser ----------------------------------------------------------------------------------------
def register(sub) -> None:
    group = sub.add_parser("policy", help="check, test, explain and compare policy files").add_subparsers(
        dest="policy_cmd", required=True)

    def with_dir(sp):
        with_config(sp)
        sp.add_argument("--dir", help="policy folder (default: policies.dir of --config, else ./policies)")
        return sp

    sp = with_dir(group.add_parser("check", help="validate the policy files and report likely mistakes"))
    sp.add_argument("--strict", action="store_true", help="warnings fail too (exit 1)")
    sp.set_defaults(func=cmd_check)

    sp = with_dir(group.add_parser("test", help="run decision tests (YAML) against the policy"))
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp.add_argument("--junit", metavar="OUT.xml", help="also write a JUnit XML report (for CI)")
    sp.add_argument("-v", "--verbose", action="store_true", help="list passing tests too")
    sp.set_defaults(func=cmd_test)

    sp = with_dir(group.add_parser("seal", help="check and test the policy files, then seal them for service"))
    sp.add_argument("tests", nargs="*", metavar="TEST_FILE",
                    help="decision tests that must pass (default: DIR/tests/*.test.yaml)")
    sp.add_argument("--strict", action="store_true", help="warnings of 'policy check' refuse the seal too")
    sp.add_argument("--without-tests", action="store_true", help="seal even if there is no decision test")
    sp.add_argument("--by", help="who seals (default: the login running the command)")
    sp.set_defaults(func=cmd_seal)

    sp = with_dir(group.add_parser("explain", help="show a decision and why"))
    sp.add_argument("--user", help="login (for --fixture or --live)")
    sp.add_argument("--roles", help="comma-separated roles, e.g. nurse,doctor")
    sp.add_argument("--units", help="comma-separated units of the user, e.g. CARDIO")
    sp.add_argument("--request", help='a request line, e.g. "GET /api/patients/P1/notes"')
    sp.add_argument("--patient", help="patient id (with --category)")
    sp.add_argument("--category", help="data category (instead of --request)")
    sp.add_argument("--action", default="read", choices=("read", "write"))
    sp.add_argument("--patient-in-unit", action="store_true",
                    help="situation: the patient stays in the user's (first) unit")
    sp.add_argument("--assigned", metavar="KIND", help="situation: the user is assigned to the patient")
    sp.add_argument("--fixture", metavar="TEST.yaml", help="take users and care team from a test file's fixture")
    sp.add_argument("--live", action="store_true",
                    help="read the user's roles and care team from Redis (the default when --config is given)")
    sp.set_defaults(func=cmd_explain)

    sp = sub_diff = group.add_parser("diff", help="decisions that change between two policy folders")
    sp.add_argument("old", metavar="OLD_DIR")
    sp.add_argument("new", metavar="NEW_DIR")
    sp.add_argument("--allow-changes", action="store_true", help="exit 0 even when decisions change")
    sub_diff.set_defaults(func=cmd_diff)
