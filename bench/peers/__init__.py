"""Side-by-side comparisons of mtrec with peer libraries (driven by bench/compare_peers.py)."""
