"""``python -m management.migrations "what changed"``: draft the next migration from the models.

Prints the new file; review it, then set :data:`management.schema.HEAD` to its revision.
"""

from __future__ import annotations

import argparse

from management.schema import new_revision


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m management.migrations",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("message", help="what the migration changes, e.g. 'add crack depth'")
    path = new_revision(parser.parse_args().message)
    print(f"wrote {path}: review it, then set HEAD in management/schema.py to {path.stem[:4]}")


if __name__ == "__main__":
    main()
