"""Ray Job entrypoint: the whole pipeline in one job: extract, train, track, score.

Runs ``rolo-batch pipeline`` with this script's arguments (``rolo-batch pipeline --help`` lists them), which prints
where its results went. A Ray Job runs it as ``python jobs/pipeline.py ...`` with the project as its working_dir
(see ``cluster/kuberay-rayjob.yaml``); from a laptop, ``rolo-batch submit -- pipeline ...`` does the same.
"""

import sys

from rolo_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
