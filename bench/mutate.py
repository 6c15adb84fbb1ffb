"""Mutation testing (mutmut 3.x) of the modules that carry the service's promises.

`make mutate` runs `python -m bench.mutate MODULE...`: for each module, mutmut mutates only that
file and runs only the test files that exercise it (TESTS below; `-x`), so one module takes
minutes rather than the whole suite per mutant. mutmut works in a copy of the tree under
`mutants/` (git-ignored), which is emptied before each module; each module's verdicts are kept in
`bench/.work/mutation/<module>.json`, and `python -m bench.mutate --report OUT.md` turns every
kept module into a markdown table (mutants, killed, survived, timeout, other, score) followed by
each surviving mutant's diff, for a person to judge (missing test, or equivalent and why).

mutmut reads its settings from pyproject.toml's `[tool.mutmut]`; the per-module file and tests
are set here on its loaded configuration before its command line runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work" / "mutation"
# mutant name -> a person's one-line judgement of a survivor (missing test, or equivalent: why)
JUDGEMENTS = ROOT / "bench" / "mutation_judgements.json"

HOSTILE_ARRIVAL = "test_a_requests_deadline_counts_from_its_arrival_not_from_its_last_byte"
HOSTILE_IN_FLIGHT = "test_requests_past_max_in_flight_are_answered_503_before_their_bodies_are_read"
# test_api.py's tests of reading bodies (the file as a whole is too slow to run per mutant)
API_BODIES = [
    "test_multipart_files_and_json_base64_give_the_same_tokens",
    "test_image_decode_of_many_grids_answers_json_items",
    "test_image_decode_accepts_msgpack_binary_tokens",
    "test_empty_body_answers_400",
    "test_more_items_than_the_limit_answer_413_however_they_are_sent",
    "test_malformed_multipart_body_answers_400_naming_the_problem",
    "test_invalid_base64_answers_400",
    "test_decode_more_tokens_than_the_limit_answers_413",
    "test_malformed_json_answers_400",
    "test_json_python_cannot_parse_answers_400",
    "test_token_payloads_that_are_not_id_grids_answer_422_saying_why",
    "test_a_client_that_disconnects_has_its_queued_item_dropped",
    "test_an_empty_body_names_the_file_it_expects",
]
# module -> the test files that exercise it (the narrowest that still cover its promises)
TESTS: dict[str, list[str]] = {
    "app/single_flight.py": ["tests/test_cache.py"],
    "app/cache/breaker.py": ["tests/test_cache.py"],
    "app/cache/redis.py": ["tests/test_cache.py"],
    "app/cache/memory.py": ["tests/test_cache.py"],
    "app/cache/format.py": ["tests/test_cache.py"],
    "app/cache/counting.py": ["tests/test_cache.py"],
    "app/cache/keys.py": ["tests/test_cache.py"],
    "app/cache/__init__.py": ["tests/test_cache.py"],
    # and the queue wait and forward it adds to each request's Server-Timing
    "app/batching.py": ["tests/test_batching.py", "tests/test_server_timing.py"],
    # the API's request handling: only the tests of its promises, each starting a fresh app
    "app/api/deps.py": [
        "tests/test_auth.py",
        "tests/test_request_timeout.py",
        f"tests/test_hostile.py::{HOSTILE_ARRIVAL}",
        "tests/test_metrics.py",
        "tests/test_tracing.py",
    ],
    "app/middleware.py": [
        "tests/test_request_limits.py",
        f"tests/test_hostile.py::{HOSTILE_ARRIVAL}",
        f"tests/test_hostile.py::{HOSTILE_IN_FLIGHT}",
        "tests/test_metrics.py",
        "tests/test_request_ids.py",
        "tests/test_server_timing.py",
        "tests/test_tracing.py",
    ],
    "app/api/requests.py": [
        "tests/test_request_bodies.py",
        "tests/test_hostile.py",
        "tests/test_sequences.py",  # bodies of a layout's ids
        "tests/test_titok.py",  # bodies of one-dimensional items
        *(f"tests/test_api.py::{name}" for name in API_BODIES),
    ],
    "app/media.py": ["tests/test_media.py"],
    "app/drain.py": [
        "tests/test_drain.py",
        "tests/test_api.py::test_readiness_fails_at_once_when_draining_while_requests_still_work",
        "tests/test_streaming.py::test_sigterm_ends_open_streams_with_their_last_tokens_end_and_1001",
    ],
}
DEFAULT_MODULES = list(TESTS)
# Modules whose tests reach them through a `tokserve serve` process (bench.server). mutmut sees
# only the calls made in the test process, so it would give a function the server alone calls
# no tests; every mutant of these modules runs every test of its row instead. The server inherits
# the mutant from the test process's environment (MUTANT_UNDER_TEST).
SERVED = {"app/drain.py"}
CAUGHT = ("killed", "timeout", "caught by type check")
# linked into mutants/ (mutmut copies only app/, tests/ and pyproject.toml)
LINKED = ["models", "examples", "docker", "docs", "k8s", "README.md"]
# copied into mutants/: bench.server starts the server in the tree its own file lies in, which a
# link would resolve to the unmutated one
COPIED = ["bench"]
# mutmut runs each mutant's tests in a process forked from one that has run them once; a torch op
# big enough to go parallel then hangs in the child (OpenMP's pool does not survive fork), and
# the hang is scored as a timeout, i.e. caught. One OpenMP thread has no pool to lose.
MUTMUT_ENV = {"OMP_NUM_THREADS": "1"}
RECHECKS = 3  # timed-out mutants rechecked at once (most of them hang until their time is up)


def _key(module: str) -> str:
    return module.replace("/", "__").removesuffix(".py")


def run_module(module: str, names: list[str], recheck_timeouts: bool = True) -> dict:
    """Run mutmut over one module (only the named mutants when given) in this process; its
    timeouts are rechecked afresh unless ``recheck_timeouts`` is off."""
    import mutmut.configuration as mc

    cfg = mc._load_config()
    cfg.only_mutate = [module]
    cfg.pytest_add_cli_args_test_selection = TESTS.get(module, ["tests"])
    mc._config = cfg
    from mutmut.__main__ import cli

    if module in SERVED:
        every_test_for_every_function(module)
    # `python -m bench.mutate` imported this tree's bench package; the tests must import the copy
    # in mutants/, whose bench.server starts the server on the mutated app
    for name in [name for name in sys.modules if name == "bench" or name.startswith("bench.")]:
        del sys.modules[name]

    try:
        cli(["run", *names], standalone_mode=False)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    result = collect(module)
    timeouts = [m["name"] for m in result["mutants"] if m["status"] == "timeout"]
    verdicts = recheck_all(module, timeouts) if timeouts and recheck_timeouts else {}
    for mutant in result["mutants"]:
        mutant["status"] = verdicts.get(mutant["name"], mutant["status"])
    return result


def test_command(module: str) -> list[str]:
    """The module's test row, as one pytest run in a fresh process."""
    tests = TESTS.get(module, ["tests"])
    return [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-p", "no:cacheprovider"]


def baseline_s(module: str) -> float:
    """How long the module's tests take unmutated in a fresh process in mutants/."""
    start = time.monotonic()
    env = {**os.environ, **MUTMUT_ENV}
    subprocess.run(test_command(module), cwd=ROOT / "mutants", env=env, capture_output=True)
    return time.monotonic() - start


def recheck(module: str, time_limit_s: float, name: str) -> str:
    """A timed-out mutant's tests run again in a fresh process (not a fork of one that already
    ran them, where a lock another thread held can hang it): killed if they fail, survived if
    they pass, timeout only if they outlast ``time_limit_s``."""
    try:
        done = subprocess.run(
            test_command(module),
            cwd=ROOT / "mutants",
            env={**os.environ, **MUTMUT_ENV, "MUTANT_UNDER_TEST": name},
            capture_output=True,
            timeout=time_limit_s,
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    return "survived" if done.returncode == 0 else "killed"


def recheck_all(module: str, names: list[str]) -> dict[str, str]:
    """Each named mutant's recheck, a few at once, each given five times the module's unmutated
    test time (20 s at least): most timed-out mutants hang until their time is up."""
    check = partial(recheck, module, max(20.0, 5 * baseline_s(module)))
    with ThreadPoolExecutor(RECHECKS) as pool:
        return dict(zip(names, pool.map(check, names), strict=True))


def every_test_for_every_function(module: str) -> None:
    """After mutmut's stats run, tie every function of ``module`` to every test it ran, so that
    tests which reach the module only through a server process run against its mutants."""
    import mutmut.__main__ as mm
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.state import state
    from mutmut.stats import save_stats
    from mutmut.utils.format_utils import mangled_name_from_mutant_name

    traced = mm.run_stats_collection

    def run_stats_collection(*args: object, **kwargs: object) -> None:
        traced(*args, **kwargs)
        mutants = SourceFileMutationData(path=Path(module))
        mutants.load()
        tests = set(state().duration_by_test)
        for name in mutants.exit_code_by_key:
            state().tests_by_mangled_function_name[mangled_name_from_mutant_name(name)] |= tests
        save_stats()

    mm.run_stats_collection = run_stats_collection


def collect(module: str) -> dict:
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    m = SourceFileMutationData(path=Path(module))
    m.load()
    mutants = []
    for name, code in sorted(m.exit_code_by_key.items()):
        status = status_by_exit_code[code]
        entry = {"name": name, "status": status}
        if status != "killed":
            try:
                entry["diff"] = get_diff_for_mutant(name, path=module)
                entry["line"] = locate(module, name, entry["diff"])
            except Exception as exc:  # a diff is a convenience; keep the verdict
                entry["diff"] = f"(no diff: {exc})"
        mutants.append(entry)
    return {"module": module, "tests": TESTS.get(module, ["tests"]), "mutants": mutants}


def locate(module: str, name: str, diff: str) -> int | None:
    """The line in `module` a mutant first changes (mutmut's diff is of the function alone)."""
    lines = (ROOT / module).read_text().splitlines()
    qual = name.rsplit("__mutmut_", 1)[0].split(".")[-1]  # xǁClassǁmethod or x_function
    parts = qual.split("\u01c1")
    cls, func = (parts[1], parts[2]) if len(parts) == 3 else (None, qual.removeprefix("x_"))
    start = 0
    if cls:
        start = next((i for i, ln in enumerate(lines) if re.match(rf"\s*class {cls}\b", ln)), 0)
    start = next(
        (i for i in range(start, len(lines)) if re.match(rf"\s*(async )?def {func}\b", lines[i])),
        start,
    )
    removed = [d[1:].strip() for d in diff.splitlines() if d.startswith("-") and d[1:2] != "-"]
    for text in removed[:1]:
        for i in range(start, len(lines)):
            if lines[i].strip() == text:
                return i + 1
    return start + 1


def _mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def summarize(result: dict) -> dict:
    counts: dict[str, int] = {}
    for m in result["mutants"]:
        counts[m["status"]] = counts.get(m["status"], 0) + 1
    total = len(result["mutants"])
    killed = counts.get("killed", 0) + counts.get("caught by type check", 0)
    survived = counts.get("survived", 0)
    timeout = counts.get("timeout", 0)
    unchecked = counts.get("not checked", 0)  # a run stopped early
    other = total - killed - survived - timeout - unchecked
    # a timeout counts as a kill (the mutant changed observable behaviour), as mutmut's own score
    checked = total - unchecked
    score = (killed + timeout) / checked if checked else 0.0
    return {
        "mutants": total,
        "unchecked": unchecked,
        "killed": killed,
        "survived": survived,
        "timeout": timeout,
        "other": other,
        "score": score,
    }


def report(out: Path) -> None:
    lines = [
        "# Mutation testing",
        "",
        f"`make mutate` (bench/mutate.py, mutmut {_mutmut_version()}). "
        "Score = (killed + timeout) / mutants checked: a mutant that makes the tests hang changed "
        "observable behaviour. mutmut mutates code inside functions and methods only (not "
        "module constants or class attributes). Each module runs against only the test files "
        "in its row, with `-x`; 'no tests' means none of them calls that function, and a "
        "survivor may still be killed by a test file outside the row (the judgement says so "
        "where known). Judgements come from bench/mutation_judgements.json; 'score without "
        "them' leaves out the survivors judged equivalent (the issue's 85% goal). A timeout is "
        "rechecked in a fresh process (mutmut's forked runs can hang on a lock another thread "
        "held; OMP_NUM_THREADS=1 keeps torch's pool out of it): killed if the tests fail, "
        "survived if they pass, a timeout only if it hangs again. 'Score before "
        "new tests' is the module's first full run; `--survivors` then reruns only the mutants it "
        "left alive.",
        "",
        "| module | tests | mutants | not checked | killed | survived | timeout | other | score "
        "| judged equivalent | score without them | score before new tests | minutes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    results = [json.loads(p.read_text()) for p in sorted(WORK.glob("*.json"))]
    judged = json.loads(JUDGEMENTS.read_text()) if JUDGEMENTS.exists() else {}
    for r in results:
        s = summarize(r)
        equivalent = sum(
            1
            for m in r["mutants"]
            if m["status"] not in ("killed", "timeout", "not checked")
            and judged.get(m["name"], "").startswith("equivalent")
        )
        caught = s["killed"] + s["timeout"]
        rest = s["mutants"] - s["unchecked"] - equivalent
        s["score_ex"] = caught / rest if rest else 0.0
        s["equivalent"] = equivalent
        before = f"{r['before']['score']:.1%}" if "before" in r else "(first run)"
        lines.append(
            f"| {r['module']} | {' '.join(r['tests'])} | {s['mutants']} | {s['unchecked']} | "
            f"{s['killed']} | "
            f"{s['survived']} | {s['timeout']} | {s['other']} | {s['score']:.1%} | "
            f"{s['equivalent']} | {s['score_ex']:.1%} | {before} | "
            f"{r.get('seconds', 0) / 60:.1f} |"
        )
    for r in results:
        left = [m for m in r["mutants"] if m["status"] not in ("killed", "timeout", "not checked")]
        for m in left:
            m["line"] = m.get("line") or locate(r["module"], m["name"], m["diff"])
        left.sort(key=lambda m: m["line"] or 0)
        lines += ["", f"## {r['module']}: {len(left)} not killed", ""]
        lines += ["| line | change | status | judgement |", "|---|---|---|---|"]
        for m in left:
            change = " → ".join(
                "`{}`".format(d[1:].strip().replace("|", "\\|"))
                for d in m["diff"].splitlines()[2:]
                if d[:1] in "-+" and d[1:2] not in "-+"
            )
            verdict = judged.get(m["name"], "not judged yet")
            lines.append(f"| {r['module']}:{m['line']} | {change} | {m['status']} | {verdict} |")
        lines += ["", "<details><summary>diffs</summary>", ""]
        for m in left:
            lines += [f"`{m['name']}`", "", "```diff", m["diff"].strip(), "```", ""]
        lines += ["</details>"]
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"default: {' '.join(DEFAULT_MODULES)}")
    parser.add_argument("--report", type=Path, help="write the markdown report of kept results")
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="rerun only the mutants a module's kept result did not kill (after adding tests, "
        "with the module itself unchanged) and update that result",
    )
    parser.add_argument(
        "--timeouts",
        action="store_true",
        help="rerun only the mutants a module's kept result holds as timeouts, each rechecked in "
        "a fresh process",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child that runs one module
    args = parser.parse_args()
    if args.one:
        path = WORK / f"{_key(args.one)}.json"
        earlier = json.loads(path.read_text()) if path.exists() else None
        kept = earlier if args.survivors or args.timeouts else None
        names = [
            m["name"]
            for m in (kept["mutants"] if kept else [])
            if (m["status"] == "timeout" if args.timeouts else m["status"] not in CAUGHT)
        ]
        if kept and not names:
            return
        if args.timeouts:  # mutmut writes mutants/ running one of them; each is rechecked afresh
            run_module(args.one, names[:1], recheck_timeouts=False)
            result = {**kept, "mutants": [dict(m) for m in kept["mutants"]]}
            verdicts = recheck_all(args.one, names)
            for mutant in result["mutants"]:
                mutant["status"] = verdicts.get(mutant["name"], mutant["status"])
        else:
            result = run_module(args.one, names)
        if kept and not args.timeouts:
            fresh = {m["name"]: m for m in result["mutants"]}
            result["mutants"] = [
                fresh.get(m["name"], m) if m["name"] in names else m for m in kept["mutants"]
            ]
            result["seconds"] = kept.get("seconds", 0)
        if earlier:  # the module's first run stays its "before", whatever ran since
            result["before"] = earlier.get("before") or summarize(earlier)
        WORK.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        return
    modules = args.modules or ([] if args.report else DEFAULT_MODULES)
    for module in modules:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        (ROOT / "mutants").mkdir()
        for name in LINKED:  # what the tests read from the tree, beside app/ and tests/
            (ROOT / "mutants" / name).symlink_to(ROOT / name)
        for name in COPIED:
            shutil.copytree(
                ROOT / name,
                ROOT / "mutants" / name,
                ignore=shutil.ignore_patterns(".work", "results", "__pycache__"),
            )
        start = time.monotonic()
        again = ["--survivors"] if args.survivors else ["--timeouts"] if args.timeouts else []
        subprocess.run(
            [sys.executable, "-m", "bench.mutate", "--one", module, *again],
            check=True,
            env={**os.environ, **MUTMUT_ENV},
        )
        path = WORK / f"{_key(module)}.json"
        result = json.loads(path.read_text())
        key = "rerun_seconds" if args.survivors or args.timeouts else "seconds"
        result[key] = round(time.monotonic() - start)
        path.write_text(json.dumps(result, indent=1))
        print(module, summarize(result), f"{result['seconds']} s", flush=True)
    if args.report:
        report(args.report)


if __name__ == "__main__":
    main()
