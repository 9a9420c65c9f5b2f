"""Ray Job entrypoint: track every video of a collection with a trained ROLO model (Ray Data).

Runs ``rolo-batch track`` with this script's arguments (``rolo-batch track --help`` lists them), which prints
where its results went. A Ray Job runs it as ``python jobs/track.py ...`` with the project as its working_dir
(see ``cluster/kuberay-rayjob.yaml``); from a laptop, ``rolo-batch submit -- track ...`` does the same.
"""

import sys

from rolo_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["track", *sys.argv[1:]]))
