"""Ray Job entrypoint: score tracks against the ground truth (OTB success and precision) and write the report.

Runs ``rolo-batch score`` with this script's arguments (``rolo-batch score --help`` lists them), which prints
where its results went. A Ray Job runs it as ``python jobs/score.py ...`` with the project as its working_dir
(see ``cluster/kuberay-rayjob.yaml``); from a laptop, ``rolo-batch submit -- score ...`` does the same.
"""

import sys

from rolo_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
