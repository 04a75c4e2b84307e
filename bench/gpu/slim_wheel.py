"""Rewrite a wheel without some of its folders, keeping its RECORD true to what is left.

Ray 2.60's cp312 wheel is 79 MB; the GPU machine takes 64 MiB in all (working tree + staged
wheels). Its Java jars (32 MB), the dashboard's web client (2.5 MB) and RLlib (2.5 MB) are
never imported by `orch run` on a local Ray without a dashboard, so they stay behind.

    python bench/gpu/slim_wheel.py IN.whl OUT.whl ray/jars/ ray/dashboard/client/ ...
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path


def slim(source: Path, target: Path, drop: list[str]) -> tuple[int, int]:
    """Copy `source` to `target` without the members under `drop`; (members kept, dropped)."""
    kept = dropped = 0
    with (
        zipfile.ZipFile(source) as src,
        zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out,
    ):
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        for info in src.infolist():
            if any(info.filename.startswith(prefix) for prefix in drop):
                dropped += 1
                continue
            if info.filename == record:
                continue  # written last, without the dropped files' lines
            # Same name, date and permission bits (the raylet and gcs_server must stay
            # executable); only the compression is chosen here.
            out.writestr(info, src.read(info), zipfile.ZIP_DEFLATED, compresslevel=9)
            kept += 1
        # RECORD lists what the wheel installs (pip uninstall and `pip check` read it): no line
        # may name a file that is no longer there.
        lines = src.read(record).decode().splitlines()
        out.writestr(
            record,
            "\n".join(line for line in lines if not line.startswith(tuple(drop))) + "\n",
        )
    return kept, dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("drop", nargs="+", help="member prefixes to leave out, e.g. ray/jars/")
    args = parser.parse_args()
    kept, dropped = slim(args.source, args.target, args.drop)
    print(
        f"{args.target.name}: kept {kept} files, dropped {dropped}; "
        f"{args.source.stat().st_size / 1e6:.1f} MB -> {args.target.stat().st_size / 1e6:.1f} MB"
    )


if __name__ == "__main__":
    main()
