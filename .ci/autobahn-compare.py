#!/usr/bin/env python3
"""Compares an Autobahn run with its committed baseline.

    autobahn-compare.py LABEL SUMMARY_JSON BASELINE_JSON

Fails (exit 1) if any case is worse than in the baseline (OK -> NON-STRICT, ... -> FAILED) or
did not run; better verdicts pass. Used by .ci/autobahn.sh and .ci/autobahn-compression.sh.
"""
import json
import sys

RANK = {"OK": 0, "INFORMATIONAL": 0, "UNIMPLEMENTED": 1, "NON-STRICT": 2, "FAILED": 3}

label, summary, baseline = sys.argv[1:4]
got = json.load(open(summary))["cases"]
expected = json.load(open(baseline))["cases"]
worse = [(case, expected.get(case), verdict) for case, verdict in got.items()
         if RANK.get(verdict, 3) > RANK.get(expected.get(case, "OK"), 0)]
missing = sorted(set(expected) - set(got))
for case, before, after in sorted(worse):
    print(f"{label}: regression in {case}: {before} -> {after}")
for case in missing:
    print(f"{label}: case {case} did not run")
if worse or missing:
    sys.exit(1)
print(f"{label}: no regression against the baseline ({len(got)} cases)")
