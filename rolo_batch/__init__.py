"""rolo-batch: ROLO (Recurrent YOLO, arXiv:1607.05781) as a distributed, dataset-scale batch processor on Ray."""

__version__ = "0.1.0"
