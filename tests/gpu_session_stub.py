"""Stands in for ``python`` when tests/test_gpu_session.py runs benchmarks/gpu_session.sh on a
machine without a GPU: each command the script would run is logged (one JSON line in
$STUB_LOG) and its arguments are checked the way the real command would check them, but
nothing is built, tested or timed. A bad argument is logged as an error and exits 2,
as argparse would."""
import json
import os
import subprocess
import sys


def _log(entry):
    with open(os.environ["STUB_LOG"], "a") as fh:
        fh.write(json.dumps(entry) + "\n")


def _fail(args, why):
    _log(dict(args=args, error=why))
    print(f"stub: {why}", file=sys.stderr)
    sys.exit(2)


def main(args):
    if args == ["-"]:  # a heredoc: it must at least compile
        src = sys.stdin.read()
        try:
            compile(src, "<stdin>", "exec")
        except SyntaxError as exc:
            _fail(args, f"heredoc does not compile: {exc}")
        _log(dict(args=args))
        return 0
    if len(args) == 2 and args[0] == "-c":  # a one-liner: it must compile (it is not run)
        try:
            compile(args[1], "<-c>", "exec")
        except SyntaxError as exc:
            _fail(args, f"-c does not compile: {exc}")
        _log(dict(args=args))
        return 0
    if len(args) < 2 or args[0] != "-m":
        _fail(args, "expected 'python -m MODULE ...' or 'python -'")
    module, rest = args[1], args[2:]
    try:
        if module in ("pip", "pyinf"):
            if module == "pip" and "-e" in rest and os.environ.get("STUB_FAIL_BUILD") == "1":
                _log(dict(args=args))
                print("stub: the build fails (STUB_FAIL_BUILD=1)", file=sys.stderr)
                return 1
        elif module == "pytest":
            # collect what the real call would run: the files exist and -k selects something
            proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *rest],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                _fail(args, f"pytest collection failed (rc {proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-500:]}")
        elif module == "benchmarks.run":
            from benchmarks.run import parse_args
            parse_args(rest)
        elif module == "benchmarks.tune":
            from benchmarks.tune import parse_args
            parse_args(rest)
        elif module == "benchmarks.preferences":
            from benchmarks.preferences import parse_args
            parse_args(rest)
        elif module == "benchmarks.sanitize":
            from benchmarks.sanitize import parse_args
            parse_args(rest)
        else:
            _fail(args, f"the stub does not know module {module!r}")
    except SystemExit as exc:  # argparse's error
        if exc.code not in (0, None):
            _fail(args, f"{module} refused its arguments: {exc.code}")
    _log(dict(args=args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
