"""Preprocessing throughput: documents/s and tokens/s with 1 worker (baseline) vs N workers, on the bundled corpus.

    python benchmarks/preprocess.py [--workers N] [--repeat K]

``--repeat`` concatenates the corpus K times (a larger, steadier run). Prints the hardware, each run's figures
and the speed-up of N workers over 1.
"""

import argparse
import gzip
import os
import platform
import resource
import shutil
import tempfile
from pathlib import Path

import tokenizers

from lightning_megatron.data.corpus import BUNDLED_CORPUS
from lightning_megatron.data.preprocess import PreprocessConfig, preprocess
from lightning_megatron.data.tokenizer import bundled_tokenizer


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    print(f"hardware: {cpu_name()}, {os.cpu_count()} logical cores; Python {platform.python_version()}, "
          f"tokenizers {tokenizers.__version__}; load average {os.getloadavg()[0]:.1f} (other work skews the ratio)")
    bundled_tokenizer()  # trained and cached outside the timed runs
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl.gz"
        with open(corpus, "wb") as out:
            for _ in range(args.repeat):
                with open(BUNDLED_CORPUS, "rb") as source:
                    shutil.copyfileobj(source, out)  # concatenated gzip members read back as one stream
        with gzip.open(corpus, "rt") as handle:
            documents = sum(1 for _ in handle)
        print(f"corpus: bundled KJV x{args.repeat} = {documents} documents, {corpus.stat().st_size / 2**20:.1f} MiB gz")
        results = {}
        for workers in sorted({1, args.workers}):
            before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
            summary = preprocess(PreprocessConfig(inputs=[str(corpus)], output_prefix=f"{tmp}/out{workers}",
                                                  append_eod=True, workers=workers), progress=False)
            main_cpu, worker_cpu = (
                (after.ru_utime + after.ru_stime) - (start.ru_utime + start.ru_stime)
                for start, after in zip(before, (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                                                 resource.RUSAGE_CHILDREN)))
            )
            results[workers] = summary
            print(f"workers={workers}: {summary.seconds:.2f} s wall, {summary.documents_per_second:,.0f} documents/s "
                  f"({summary.documents_per_second / workers:,.0f} per worker), {summary.tokens_per_second:,.0f} "
                  f"tokens/s; CPU: main process {main_cpu:.2f} s, workers {worker_cpu:.2f} s = "
                  f"{summary.tokens / max(worker_cpu, 1e-9):,.0f} tokens per worker CPU-second")
        if len(results) == 2:
            speedup = results[args.workers].tokens_per_second / results[1].tokens_per_second
            print(f"speed-up of {args.workers} workers over 1: {speedup:.2f}x "
                  f"(parallel efficiency {speedup / args.workers:.0%})")


if __name__ == "__main__":
    main()
