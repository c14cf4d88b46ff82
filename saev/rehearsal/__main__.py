"""``python -m saev.rehearsal build|judge --profile NAME``: write a rehearsal profile's models and data
sets, or serve its stub judge on loopback until interrupted (``run_all.sh`` does both)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from saev.config import ConfigError

    parser = argparse.ArgumentParser(prog="python -m saev.rehearsal", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("build", "judge"))
    parser.add_argument("--profile", required=True, help="profile name in params/ or YAML path")
    args = parser.parse_args(argv)
    try:
        from saev.paper.profile import load_profile

        profile = load_profile(args.profile)
        if profile.rehearsal is None:
            raise ConfigError(f"{profile.source}: not a rehearsal profile (it has no 'rehearsal:' section)")
        if args.command == "build":
            from saev.rehearsal.config import build_rehearsal

            for name, path in build_rehearsal(profile).items():
                print(f"  {name:<15} {path}")
            return 0
        from saev.rehearsal.judge import serve

        serve(profile.rehearsal.judge_port)
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
