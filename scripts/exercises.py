"""Run the classroom exercises of docs/exercises.md and tabulate what they produced.

    python scripts/exercises.py list               # the commands, as the page gives them
    python scripts/exercises.py run --exercise 1   # run exercise 1's commands (all: no flag)
    python scripts/exercises.py table              # FD_rot, losses and accuracies of the runs

The commands are read from the page itself, so the page, this script and
tests/test_exercises.py cannot drift apart. Runs of the same setting that differ only in
--seed are grouped: the table gives each seed's value and their mean.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "exercises.md")


def read_page(path=PAGE):
    """(variables, [(exercise number, command)]) from the page's bash blocks.

    A variable is a line NAME="value"; a command is a line starting with python (except this
    script's own), with backslash continuations joined. Exercise numbers come from the "## N."
    headings (0 before the first one: the set-up commands).
    """
    variables, commands, exercise, block = {}, [], 0, None
    for line in open(path).read().splitlines():
        heading = re.match(r"## (\d+)\.", line)
        if heading:
            exercise = int(heading.group(1))
        if line.startswith("```"):
            block = [] if line.strip() == "```bash" and block is None else None
            continue
        if block is None:
            continue
        block.append(line)
        text = " ".join(part.rstrip("\\").strip() for part in block)
        if line.endswith("\\"):
            continue
        block.clear()
        assignment = re.fullmatch(r'([A-Z_]+)="([^"]*)"', text)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
        elif text.startswith("python ") and "exercises.py" not in text:
            commands.append((exercise, text.split("#")[0].strip()))
    return variables, commands


def expand(command, variables):
    """The argument list of a command, its $VARIABLES replaced."""
    words = []
    for word in shlex.split(command):
        words += shlex.split(variables[word[1:]]) if word.startswith("$") else [word]
    return words


def flag(words, name, default=None):
    return words[words.index(name) + 1] if name in words else default


def summary(out):
    """The last training line, the last evaluation and the stage lines of one run folder."""
    path = os.path.join(ROOT, out, "log.jsonl")
    if not os.path.exists(path):
        return None
    records = [json.loads(line) for line in open(path)]
    train_lines = [r for r in records if "loss_d" in r]
    evals = [r for r in records if "FD_rot" in r or "FID" in r]
    result = dict(train_lines[-1]) if train_lines else {}
    if evals:
        result.update(evals[-1])
    return result


def table(commands, variables):
    """Markdown rows, one per setting (runs equal but for --seed), in the page's order."""
    groups = {}
    for exercise, command in commands:
        words = expand(command, variables)
        if "train.py" not in words[1]:
            continue
        out = flag(words, "--out")
        setting = re.sub(r"_\d+$", "", out) if out else command
        groups.setdefault((exercise, setting), []).append((flag(words, "--seed", "0"), out))
    keys = ["FD_rot", "loss_d", "loss_g", "acc_rot_real", "acc_labels", "elapsed_s"]
    rows = ["| ex. | run | seeds | " + " | ".join(keys) + " |", "|---" * (len(keys) + 3) + "|"]
    for (exercise, setting), runs in groups.items():
        found = [(seed, summary(out)) for seed, out in runs]
        found = [(seed, s) for seed, s in found if s]
        if not found:
            rows.append(f"| {exercise} | `{setting}` | not run | " + " | ".join("" for _ in keys)
                        + " |")
            continue
        cells = []
        for key in keys:
            values = [s[key] for _, s in found if key in s]
            if not values:
                cells.append("")
            elif len(values) == 1:
                cells.append(f"{values[0]:.3g}")
            else:
                mean = sum(values) / len(values)
                cells.append(f"{mean:.3g} ({' / '.join(f'{v:.3g}' for v in values)})")
        seeds = ",".join(seed for seed, _ in found)
        rows.append(f"| {exercise} | `{setting}` | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["list", "run", "table"])
    p.add_argument("--exercise", type=int, nargs="*", help="only these exercises (0: set-up)")
    p.add_argument("--page", default=PAGE, help="the exercises page")
    args = p.parse_args(argv)
    variables, commands = read_page(args.page)
    if args.exercise:
        commands = [c for c in commands if c[0] in args.exercise]
    if args.action == "list":
        for exercise, command in commands:
            print(f"{exercise}: {command}")
    elif args.action == "table":
        print(table(commands, variables))
    else:
        for exercise, command in commands:
            start = time.time()
            print(f"exercise {exercise}: {command}", flush=True)
            words = expand(command, variables)
            done = subprocess.run([sys.executable, *words[1:]], cwd=ROOT)
            if done.returncode:
                raise SystemExit(f"error: exercise {exercise} failed: {command}")
            print(f"exercise {exercise}: {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
