"""Ray Job entrypoint: train the ROLO LSTM on extracted features (Ray Train, data-parallel).

Runs ``rolo-batch train`` with this script's arguments (``rolo-batch train --help`` lists them), which prints
where its results went. A Ray Job runs it as ``python jobs/train.py ...`` with the project as its working_dir
(see ``cluster/kuberay-rayjob.yaml``); from a laptop, ``rolo-batch submit -- train ...`` does the same.
"""

import sys

from rolo_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
