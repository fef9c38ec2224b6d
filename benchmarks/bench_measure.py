"""Run the measurement benchmark from the benchmarks folder: python benchmarks/bench_measure.py [options].

Same as `mqpredict bench measure` (see `mqpredict bench measure --help`)."""

import sys

from mqpredict.cli.main import main

if __name__ == "__main__":
    sys.argv[1:1] = ["bench", "measure"]
    main()
