"""Prints docs/bad_inputs.md: every bad input of tests/test_bad_inputs.py with the one-line
error the CLI gives it (paths shortened to their last part).

  python scripts/bad_inputs_table.py > docs/bad_inputs.md
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_bad_inputs import CASES, _tokenizer, make_inputs, run_case  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_inputs(Path(tmp), _tokenizer())
        print("# Bad inputs and what the CLI says\n")
        print("Each row is a case of `tests/test_bad_inputs.py` (which checks a non-zero exit, one line on "
              "stderr without a traceback, and no file written); regenerate with "
              "`python scripts/bad_inputs_table.py > docs/bad_inputs.md`. `DIR` is the model directory.\n")
        print("| what the user did | exit | the one line on stderr |")
        print("|---|---|---|")
        for what, argv, _ in CASES:
            args = argv(paths)
            common = ["--calibration", str(paths["text"]), "--n-samples", "8", "--seq-len", "16",
                      "--eval-windows", "0"] if args[0] == "compress" else []
            rc, err = run_case(args[:2] + common + args[2:])
            line = err.strip().replace(str(paths["good"]), "DIR").replace(tmp + "/", "")
            line = re.sub(r"\s+", " ", line).replace("|", "\\|")
            print(f"| {what} | {rc} | `{line}` |")


if __name__ == "__main__":
    main()
