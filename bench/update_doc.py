#!/usr/bin/env python3
"""Replace one benchmark's section of docs/benchmarks.md with a new report.

usage: update_doc.py DOC NAME REPORT DATE [BY]
(BY: the command that measured it, bench/run unless given.)
The section is the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; it is appended
to the document when missing.
"""
import sys

doc, name, report_path, date = sys.argv[1:5]
by = sys.argv[5] if len(sys.argv) > 5 else "bench/run"
begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
with open(report_path) as f:
    report = f.read().strip()
section = f"{begin}\n{report}\n\nMeasured {date} by `{by}`.\n{end}"
try:
    with open(doc) as f:
        text = f.read()
except FileNotFoundError:
    text = "# Benchmarks\n"
if begin in text and end in text:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    text = head + section + tail
else:
    text = text.rstrip() + "\n\n" + section + "\n"
with open(doc, "w") as f:
    f.write(text)
