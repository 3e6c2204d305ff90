"""The table of refused cases (case, exit status, stderr lines) from a run of the test_refuse_* tests.

    NUMPRUNE_FRESH_PROCESS=1 NUMPRUNE_CASE_LOG=cases.jsonl python -m pytest -q tests/test_refuse_*.py
    python scripts/refusal_table.py cases.jsonl

``NUMPRUNE_FRESH_PROCESS=1`` runs every case as its own ``python -m numprune`` process, so the exit
status and stderr are the real process's (slow: 5-25 s a case); without it most cases run through
``numprune.cli.main`` in the test process (the process column says which).
"""

import json
import sys

from numprune.io.table import markdown_table


def main(log: str) -> None:
    rows = [json.loads(line) for line in open(log)]
    print(markdown_table(("case", "exit", "stderr lines", "process"),
                         [(f"`{row['case']}`", row["exit"], row["stderr_lines"], row.get("process", "fresh"))
                          for row in rows]))


if __name__ == "__main__":
    main(sys.argv[1])
