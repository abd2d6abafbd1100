"""`fedshield audit RUN_DIR_OR_LEDGER [--ledger-keys DIR] [--json] [--out DIR] [--budget SITE=EPS ...]`
`fedshield audit --site STATE_DIR`: a site's own books (at the site, or a copy of its folder)

`--site STATE_DIR` checks what a run directory cannot show: that the site's ledger is whole,
from its first spend (seq 0) to the newest one its signed head record names (nothing cut off
the end), every entry signed by the site's `site.pub`, with an interrupted spend in
`ledger.jsonl.pending` counted as the site counts it (verified first, never appended: an
audit only reads); then it audits the ledger as usual.

`--ledger-keys DIR`: the public halves of the sites' ledger signing keys (`<site>.pub`, each
site's `<state-dir>/site.pub`), not their connection keys. `--site-keys` is its old
spelling: it still works, with a note on stderr.

Exit status: 0 everything verifies (chain, signatures) and nothing is flagged; 1 tampering,
unchecked signatures, an under-reported ε or a site over budget (the first problem is
printed); 2 bad input (one line: "error: ...").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from fedshield.privacy.errors import FedShieldError

if TYPE_CHECKING:  # imported when an audit runs: `--help` and bad input stay fast
    from fedshield.privacy.audit import AuditResult


def _budget(text: str) -> tuple[str, float]:
    site, sep, eps = text.rpartition("=")
    try:
        value = float(eps)
    except ValueError:
        value = math.nan
    if not sep or not site or not (value > 0) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"--budget {text!r}: expected SITE=EPS with EPS > 0")
    return site, value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number > 0")
    return value


class _OldLedgerKeys(argparse.Action):  # --site-keys, the old spelling of --ledger-keys
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"note: {option_string} is deprecated; use --ledger-keys", file=sys.stderr)
        namespace.ledger_keys = values


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, as for every bad input
        raise FedShieldError(f"audit: {message}")


def audit_main(argv: list[str]) -> int:
    p = _Parser(prog="fedshield audit", description="Verify a privacy ledger and recompute ε independently.",
                epilog="""examples:
  fedshield audit runs/RUN                              verify the run's ledger, recompute ε, write RUN/audit/
  fedshield audit runs/RUN --max-epsilon 8 --json       fail (exit 1) if any site's ε is above 8
  fedshield audit ledger.jsonl --ledger-keys keys/ --budget st-marys=3
  fedshield audit --site /var/lib/fedshield             a site's own books: whole from seq 0 to its head
  fedshield audit --empirical --canaries 200            canary audit: an empirical lower bound on ε

exit status: 0 verified, 1 a problem (tampering, over budget, under-reported ε), 2 bad input
""", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="RUN_DIR_OR_LEDGER", type=Path, nargs="?")
    p.add_argument("--site", type=Path, default=None, metavar="STATE_DIR",
                   help="a site's state folder: also check its books are whole (seq 0 to its signed head)")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--ledger-keys", type=Path, default=None, metavar="DIR",
                      help="folder with each site's ledger signing public key as <site>.pub, obtained from the sites")
    keys.add_argument("--site-keys", type=Path, dest="ledger_keys", action=_OldLedgerKeys, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", type=Path, default=None, help="report folder (default <run_dir>/audit/)")
    p.add_argument("--budget", type=_budget, action="append", default=[], metavar="SITE=EPS")
    p.add_argument("--max-epsilon", type=_positive, default=None, metavar="EPS",
                   help="fail if any site's ε is above EPS: the larger of its recorded ε and the recomputation "
                        "with its ledger's own accountant (other accountants are shown, not judged)")
    try:
        args = p.parse_args(argv)
        if (args.path is None) == (args.site is None):
            raise FedShieldError("audit: give a run directory or ledger, or --site STATE_DIR (one of the two)")
        # A thin layer over the Python API (`fedshield.audit`, docs/api.md): the same function.
        from fedshield.privacy.audit import audit_and_report

        site_books = args.site is not None
        result = audit_and_report(args.path or args.site, args.ledger_keys, dict(args.budget) or None,
                                  args.max_epsilon, site_books=site_books, report_dir=args.out)
    except FedShieldError as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 2
    assert result.report_markdown is not None and result.report_html is not None
    if site_books and not result.first_problem.startswith("site books: "):
        print(f"site books: {args.site / 'ledger.jsonl'} is whole from seq 0 to its signed head record")
    if args.json:
        data = result.to_json()
        data["report"] = {"markdown": str(result.report_markdown), "html": str(result.report_html)}
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        _print_summary(result, result.report_markdown, result.report_html)
    if not result.ok:
        print(f"AUDIT FAILED: {result.first_problem}", file=sys.stderr)
        return 1
    return 0


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return "inf" if math.isinf(x) else "n/a" if math.isnan(x) else f"{x:.4f}"
    return "-" if x is None else str(x)


def _print_summary(result: AuditResult, md: Path, html: Path) -> None:
    from fedshield.privacy.report import opinions, parameter_rows

    v = result.verify
    print(f"ledger: {result.ledger_path}")
    print(f"entries: {v.checked.get('entries', 0)}, sites: {v.checked.get('sites', 0)}, "
          f"chain: {'ok' if v.ok else 'BROKEN'}, signatures: "
          + (f"{v.checked.get('signatures', 0)} verified" if v.signatures_checked else "NOT CHECKED"))
    print(f"keys: {result.key_note}")
    head = (f"{'site':<16} {'entries':>7} {'steps':>6} {'δ':>7} {'relation':>11} {'accountant':>11} "
            f"{'ε recorded':>10} {'ε recomputed':>12} {'budget':>7}  {'status':<14} opinions (not judged)")
    print(head)
    for name, s in sorted(result.sites.items()):
        flagged = any(r["flag"] for r in result.entries if r["site"] == name)
        above = result.max_epsilon is not None and s.verdict_epsilon > result.max_epsilon
        status = ("UNDER-REPORTED" if flagged else "OVER BUDGET" if s.over_budget
                  else "ABOVE MAX" if above else "ok")
        if s.partial:
            status += " (partial)"
        print(f"{name:<16} {s.entries:>7} {s.steps:>6} {','.join(f'{d:g}' for d in s.deltas):>7} "
              f"{s.neighbouring:>11} {s.verdict_accountant:>11} {_fmt(s.recorded_epsilon):>10} "
              f"{_fmt(s.recomputed_epsilon):>12} {_fmt(s.budget):>7}  {status:<14} {opinions(s.opinions)}")
    print(f"{'site':<16} {'mechanism':<26} {'σ':>9} {'q':>9} {'clip C':>7} {'steps':>6} {'δ':>7} relation")
    for name, mechanism, sigma, q, clip, steps, _, delta, relation in parameter_rows(result):
        print(f"{name:<16} {mechanism:<26} {sigma:>9} {q:>9} {clip:>7} {steps:>6} {delta:>7} {relation}")
    for n in result.notes:
        print(f"note: {n}")
    print(f"report: {md}  {html}")
    print("audit: PASSED" if result.ok else f"audit: FAILED ({len(result.flags)} problem(s))")


def main() -> None:  # pragma: no cover
    sys.exit(audit_main(sys.argv[1:]))


if __name__ == "__main__":  # pragma: no cover
    main()
