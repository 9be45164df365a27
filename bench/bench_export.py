"""Latency and throughput of an exported run in ONNX Runtime (CPU) next to mtrec predict's PyTorch
path (encode with Polars + the model in torch), at batch 1 and 1,024 (docs/benchmarks.md, "Export").

    OMP_NUM_THREADS=1 python bench/bench_export.py            # MMoE, 20k-row synthetic log with a 20-long history
    python bench/bench_export.py --threads 1 --repeats 200

Both paths start from the same raw Polars rows: ONNX Runtime's time includes ``onnx_inputs`` (the
feed dict) and the graph (encoding + network); PyTorch's includes ``encode`` and ``frame_to_split``.
Medians over the repeats, after a warm-up; batches alternate (ORT, torch, ORT, ...) so that load
from other work falls on both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402
import torch  # noqa: E402

from mtrec.cli import app  # noqa: E402
from mtrec.data.encode import encode  # noqa: E402
from mtrec.data.tensors import frame_to_split  # noqa: E402
from mtrec.engine.build import feature_names  # noqa: E402
from mtrec.metrics.split import predict  # noqa: E402
from mtrec.serving.evaluate import load_run  # noqa: E402
from mtrec.serving.export import onnx_inputs  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "sample_data" / "sequence_spec.toml"


def cli(*args):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="mmoe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    root = Path(tempfile.mkdtemp(prefix="bench-export-"))
    cli("synth", "--rows", args.rows, "--history", 20, "--out", root / "log.parquet")
    cli("preprocess", root / "log.parquet", "--labels", "click,like,share", "--user", "user_id", "--item", "item_id",
        "--time", "ts", "--spec", SPEC, "--out", root / "data")
    cli("train", root / "data", "--model", args.model, "--target", "click", "--epochs", "1", "--device", "cpu",
        "--quiet", "--out", root / "run")
    cli("export", root / "run", "--out", root / "model.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = args.threads
    session = ort.InferenceSession(str(root / "model.onnx"), options, providers=["CPUExecutionProvider"])
    model, cfg, tasks, schema = load_run(root / "run", device="cpu")
    columns = feature_names(schema)
    log = pl.read_parquet(root / "log.parquet")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} thread(s), {args.model}, "
          f"model file {(root / 'model.onnx').stat().st_size / 1e6:.1f} MB")

    def onnx_path(rows):
        return session.run(None, onnx_inputs(rows, root / "model.onnx"))

    def torch_path(rows):
        encoded = encode(rows, schema, root / "run" / "vocab", labels=[], check=False)
        return predict(model, frame_to_split(encoded, *columns, []), cfg.eval_batch_size)

    for batch in (1, 1024):
        times = {"onnxruntime (feed + graph)": [], "onnxruntime graph only": [], "torch (mtrec predict path)": []}
        for r in range(args.repeats + 5):
            rows = log.slice((r * batch) % (log.height - batch), batch)
            feed = onnx_inputs(rows, root / "model.onnx")
            paths = (("onnxruntime (feed + graph)", onnx_path),
                     ("onnxruntime graph only", lambda _, feed=feed: session.run(None, feed)),
                     ("torch (mtrec predict path)", torch_path))
            for name, fn in paths:
                start = time.perf_counter()
                fn(rows)
                if r >= 5:
                    times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            median = statistics.median(values)
            print(f"batch {batch:5d}  {name:27s} median {median * 1e3:8.3f} ms  {batch / median:12,.0f} rows/s")


if __name__ == "__main__":
    main()
