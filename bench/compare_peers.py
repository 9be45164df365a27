"""Side-by-side benchmarks of mtrec against the tools users would pick instead.

    python bench/compare_peers.py libmtl     [--quick]   # balancer combine step vs LibMTL 1.1.5
    python bench/compare_peers.py gauc       [--quick]   # GAUC vs sklearn per-user loop and FuxiCTR gAUC
    python bench/compare_peers.py preprocess [--quick]   # preprocessing vs FuxiCTR and a pandas baseline
             [--rows 1000000,10000000] [--tools mtrec,pandas,fuxictr,fuxictr-ray]
    python bench/compare_peers.py rechub     [--quick]   # MMoE training vs torch-rechub (EW and MetaBalance)

Each command prints one table whose ratios come from the same run. Peers live in their own
environment (bench/peers-requirements.txt; docs/benchmarks.md has the setup and the results);
they are never mtrec dependencies. Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mtrec
sys.path.insert(0, str(Path(__file__).resolve().parent))  # peers


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":  # subprocess side of preprocess / rechub
        import importlib

        importlib.import_module(f"peers.{sys.argv[2]}").worker(sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("comparison", choices=["libmtl", "gauc", "preprocess", "rechub"])
    ap.add_argument("--quick", action="store_true", help="smaller sizes / fewer repetitions (a smoke run)")
    ap.add_argument("--rows", type=str, default=None, help="preprocess: comma-separated row counts")
    ap.add_argument("--tools", type=str, default=None,
                    help="preprocess: tools to compare (mtrec,pandas,fuxictr[,fuxictr-ray]; default without Ray)")
    ap.add_argument("--seeds", type=str, default=None, help="rechub: comma-separated seeds (default 1,2,3)")
    ap.add_argument("--workdir", type=str, default=None, help="where data and runs go (default: a temp dir)")
    args = ap.parse_args()
    if args.comparison == "libmtl":
        from peers import libmtl

        libmtl.run(args.quick)
    elif args.comparison == "gauc":
        from peers import gauc

        gauc.run(args.quick)
    elif args.comparison == "preprocess":
        from peers import preprocess

        preprocess.run(args.quick, args.rows, args.workdir, args.tools)
    else:
        from peers import rechub

        rechub.run(args.quick, args.seeds, args.workdir)


if __name__ == "__main__":
    main()
