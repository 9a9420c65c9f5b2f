"""Ray Job entrypoint: extract per-frame YOLO features and detections from a video collection (Ray actors on GPUs).

Runs ``rolo-batch extract`` with this script's arguments (``rolo-batch extract --help`` lists them), which prints
where its results went. A Ray Job runs it as ``python jobs/extract.py ...`` with the project as its working_dir
(see ``cluster/kuberay-rayjob.yaml``); from a laptop, ``rolo-batch submit -- extract ...`` does the same.
"""

import sys

from rolo_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
