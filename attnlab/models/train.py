"""Train an organism: ``python -m attnlab.models.train lm|vlm|dit|induction|sink [ARGS]`` (``--help`` after the kind
for its options).

Each kind's script lives in ``attnlab.models.training.<kind>`` and writes ``save_pretrained`` files, a loss log,
final metrics and a MODEL_CARD.md into ``--out``.
"""

from __future__ import annotations

import importlib
import sys

KINDS = ("lm", "vlm", "dit", "induction", "sink")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in KINDS:
        print(
            f"usage: python -m attnlab.models.train {{{'|'.join(KINDS)}}} [options]   "
            "(then --help for the kind's options)",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(f"attnlab.models.training.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
