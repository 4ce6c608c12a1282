"""Print one of the two set-up commands README.md gives, so CI runs exactly what users read.

    python3 .ci/readme_command.py main    # installs and runs the main job (the labs)
    python3 .ci/readme_command.py test    # installs and runs the tests

They are the two ```bash blocks of README.md's "## Set up on a fresh machine" section, in that
order; anything else there is an error, so the README and CI cannot drift apart silently.
"""
import pathlib
import re
import sys

SECTION = "## Set up on a fresh machine"


def commands(readme):
    start = readme.index(SECTION) + len(SECTION)
    end = readme.find("\n## ", start)
    section = readme[start:end if end != -1 else None]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [b.strip() for b in blocks]
    if len(lines) != 2 or any("\n" in line for line in lines):
        raise SystemExit(f"README.md: expected two one-line bash blocks under {SECTION!r}, "
                         f"found {lines}")
    return dict(zip(("main", "test"), lines))


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = commands(readme)
    if which not in table:
        raise SystemExit(f"usage: {sys.argv[0]} main|test")
    print(table[which])
