"""Ray Job entrypoint: measure the stages' speed and memory against a baseline from the same run.

Runs ``rolo-batch benchmark`` with this script's arguments (``rolo-batch benchmark --help`` lists them), which prints
where its results went. A Ray Job runs it as ``python jobs/benchmark.py ...`` with the project as its working_dir
(see ``cluster/kuberay-rayjob.yaml``); from a laptop, ``rolo-batch submit -- benchmark ...`` does the same.
"""

import sys

from rolo_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
